"""A training run's log: DIR/log.jsonl, one JSON record per evaluation (the step, tokens, losses, validation loss
and bits per byte of each domain, and for an OLMoE each layer's largest expert share and routing entropy). train.py
appends to it, and drops the records a resumed run will redo; experiments.py reads it; its curves are drawn here:
one run's curves.png at the end of every run, and several runs side by side (train.py --compare-runs). matplotlib is
optional: without it a run draws nothing."""

import json
import math
from pathlib import Path

import torch


def append(run, record):
    """One evaluation's record, at the end of the run's log."""
    with open(Path(run) / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def drop_after(run, step):
    """--resume from `step`: the records of later steps go, which a run killed after its last checkpoint logged and
    will now log again."""
    log = Path(run) / "log.jsonl"
    if log.is_file():
        kept = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= step]
        log.write_text("".join(line + "\n" for line in kept))


def records(run):
    """A run's log.jsonl: one dict per evaluation."""
    log_file = Path(run) / "log.jsonl"
    if not log_file.is_file():
        raise ValueError(f"{run}: no log.jsonl there (expected a train.py --out directory)")
    return [json.loads(line) for line in log_file.read_text().splitlines()]


# --------------------------------------------------------------------------------------------------------------
# Curves


def plot(run, png, title, balanced=None):
    """One run's curves: losses over tokens, and (OLMoE) each layer's largest expert share against `balanced`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    log = records(run)
    moe = "max_share" in log[-1]
    fig, axes = plt.subplots(1, 2 if moe else 1, figsize=(12 if moe else 6, 4.5), squeeze=False)
    ax = axes[0, 0]
    trained = [r for r in log if r["train_loss"] is not None]
    ax.plot([r["tokens"] for r in trained], [r["train_loss"] for r in trained], label="train (one batch)")
    for d in log[-1]["val"]:
        ax.plot([r["tokens"] for r in log], [r["val"][d] for r in log], marker=".", label=f"validation: {d}")
    ax.set(xlabel="tokens trained", ylabel="cross-entropy (nats per token)", title="loss")
    ax.legend()
    if moe:
        ax = axes[0, 1]
        for layer in range(len(log[-1]["max_share"])):
            ax.plot([r["tokens"] for r in log], [r["max_share"][layer] for r in log], label=f"layer {layer}")
        ax.axhline(balanced, color="gray", linestyle="--", label="perfect balance (1/E)")
        ax.set(xlabel="tokens trained", ylabel="largest expert's share of token-expert pairs",
               title="expert load on the validation text")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot_runs(runs, png):
    """Several runs side by side (e.g. an ablation of --lb-coef): mean validation loss over the domains, and each
    run's largest expert share and routing entropy, the mean over layers with the range from the most to the least
    balanced layer shaded."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--compare-runs draws with matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), layout="constrained")
    E = None
    for run, color in zip(runs, plt.get_cmap("tab10").colors):
        try:
            log = records(run)
        except ValueError as e:
            raise ValueError(f"--compare-runs {e}") from None
        E = json.loads(next(Path(run).glob("step-*/config.json")).read_text())["num_experts"]
        x = [r["tokens"] for r in log]
        axes[0].plot(x, [sum(r["val"].values()) / len(r["val"]) for r in log], color=color, label=Path(run).name)
        for ax, key in zip(axes[1:], ("max_share", "entropy_bits")):
            values = torch.tensor([r[key] for r in log])  # (evaluations, L)
            ax.plot(x, values.mean(1), color=color, label=f"{Path(run).name}: mean over layers")
            ax.fill_between(x, values.min(1).values, values.max(1).values, color=color, alpha=0.2)
    axes[0].set(xlabel="tokens trained", ylabel="validation cross-entropy (nats per token),\nmean over the domains",
                title="validation loss")
    axes[1].axhline(1 / E, color="gray", linestyle="--", label="perfect balance, 1/E")
    axes[1].set(xlabel="tokens trained", ylabel="largest expert's share of token-expert pairs", yscale="log",
                title="expert load (shaded: range over layers)")
    axes[2].axhline(math.log2(E), color="gray", linestyle="--", label="perfect balance, log2 E")
    axes[2].set(xlabel="tokens trained", ylabel="entropy of the experts' shares (bits)",
                title="routing entropy (shaded: range over layers)")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(f"{len(runs)} train.py runs on their validation text: {', '.join(Path(r).name for r in runs)}")
    fig.savefig(png, dpi=100)
    plt.close(fig)
