"""The routing lab: which experts OLMoE's router picks for a text, measured as in the OLMoE paper's section 5
(Muennighoff et al. 2024, "OLMoE: Open Mixture-of-Experts Language Models", arXiv 2409.02060).

python routing.py --checkpoint allenai/OLMoE-1B-7B-0924 --text prose=README.md --text code=olmoe.py --out lab/

Read top to bottom: counting (pure functions over routing choices) -> the paper's ratios -> running a model over
texts in chunks -> report.md and routing.json -> figures -> the command line. Expert counts, the load-balancing
losses and the load's largest share and entropy come from balance.py, which train.py logs with too.

Every analysis starts from the routing choices: for each layer and token, the k experts with the highest router
probability, most probable first. k is ours to choose (--top-k, 8 by default as in the paper, or 1); the model
itself always routes each token to K = num_experts_per_tok of them. Everything counted is a sum over tokens, so
statistics of successive chunks of text simply add up.

Shape legend (as in olmoe.py):
    L  layers              N  tokens               E  experts per layer
    k  experts counted per token (--top-k)         K  experts the model routes each token to
    V  vocabulary
    choices  (L, N, k) int64 expert ids         probs  (L, N, E) float32 router probabilities
"""

import argparse
import json
import math
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import balance
import checkpoints
import cli
import devices
import text
import variants

# --------------------------------------------------------------------------------------------------------------
# Counting: pure functions from routing choices to counts. Everything else divides these.


def top_experts(probs, k):
    """The k most probable experts of each token, most probable first: (L, N, E) -> (L, N, k). Ranking by the
    probabilities is ranking by the router's logits; k may be more or fewer than the model's own K."""
    return probs.topk(k, dim=-1).indices


def multi_hot(choices, E):
    """(L, N, k) expert ids -> (L, N, E) float, 1 where the token chose the expert. Counting becomes matmuls."""
    return torch.zeros(*choices.shape[:-1], E, device=choices.device).scatter_(-1, choices, 1.0)


def coactivation_counts(choices, E):
    """N(E_i, E_j) per layer: how many tokens chose both expert i and expert j (same token, same layer), over all
    pairs of a token's k experts. The diagonal N(E_i, E_i) is N(E_i). (L, N, k) -> (L, E, E), symmetric."""
    m = multi_hot(choices, E)  # (L, N, E)
    return (m.transpose(1, 2) @ m).round().long()  # (L, E, N) @ (L, N, E) -> (L, E, E); exact below 2^24 tokens


def token_expert_counts(ids, choices, V, E):
    """N(x, E_i) for one layer: how often token id x had expert i in its top k, and N_x, how often x occurred.
    ids (N,) keys the count (the input tokens, or the tokens the model predicts next); choices (N, k).
    Returns ((V, E), (V,))."""
    pairs = (ids[:, None] * E + choices).flatten()  # (N*k,) one bin per (token id, expert)
    return pairs.bincount(minlength=V * E).view(V, E), ids.bincount(minlength=V)


def shared_experts(a, b):
    """|E^(k)(x; a) ∩ E^(k)(x; b)|: how many of each token's k experts two routings agree on. (L, N, k) x 2 ->
    (L, N). Order within the top k does not matter."""
    return (a[..., :, None] == b[..., None, :]).any(-1).sum(-1)  # (L, N, k, k) -> (L, N, k) -> (L, N)


# --------------------------------------------------------------------------------------------------------------
# The paper's analyses (section 5), as ratios of the counts above


def saturation(a, b):
    """Router saturation, the paper's Eq. 5: per layer, the mean over tokens of |E^(k)(x; t) ∩ E^(k)(x; final)| / k,
    the share of a token's top-k experts at checkpoint t that are also its top k at the final checkpoint.
    a, b: (L, N, k) choices of the two checkpoints on the same tokens. Returns (L,). Routing at random gives k/E."""
    return shared_experts(a, b).float().mean(-1) / a.shape[-1]


def expert_load(counts):
    """Load balance: each expert's share of a layer's N*k token-expert pairs. (L, E) counts -> (L, E), each row
    summing to 1. Perfect balance is 1/E for every expert."""
    return counts / counts.sum(-1, keepdim=True).clamp(min=1)


def coactivation(counts):
    """Expert co-activation, the paper's Eq. 6: N(E_i, E_j) / N(E_i), the share of the tokens that chose expert i
    that also chose expert j. counts: (L, E, E) from coactivation_counts. Returns (L, E, E), row i for expert i;
    the diagonal is 1 by definition, and rows of experts no token chose are 0.
    This counts every pair of a token's k experts, as Eq. 6 defines it. The paper's released analysis code
    counted only pairs adjacent in the probability-sorted top k, which gives smaller values for k > 2."""
    n_i = counts.diagonal(dim1=1, dim2=2)  # (L, E): N(E_i)
    return counts / n_i[:, :, None].clamp(min=1)


def domain_specialization(counts, n_tokens):
    """Domain specialization, the paper's Eq. 7: N^(k)(E_i, D) / N_D, the share of domain D's tokens that include
    expert i among their top k. counts: (L, E) from expert_counts over D's tokens; n_tokens: N_D. Returns (L, E).
    Routing uniformly at random gives k/E; 1 means every token of the domain uses the expert."""
    return counts / n_tokens


def vocab_specialization(counts, n, min_count=10):
    """Vocabulary specialization, the paper's Eq. 8: N^(k)(x, E_i) / N_x, the share of token x's occurrences that
    include expert i among their top k. counts (V, E), n (V,) from token_expert_counts, keyed on the input token
    ids (input variant) or on the model's predicted next tokens (output variant). Rows of ids seen fewer than
    min_count times are NaN: a share of 2 occurrences says nothing. Returns (V, E)."""
    share = counts / n[:, None].clamp(min=1)
    return share.masked_fill((n < min_count)[:, None], float("nan"))


# --------------------------------------------------------------------------------------------------------------
# Running a model over texts, in chunks


@dataclass
class Stats:
    """One domain's routing statistics, all sums over its tokens (so chunks add up). `layer` is the one whose
    vocabulary specialization is counted; sample_* keep the first few tokens for the per-token picture."""

    tokens: int
    expert_counts: torch.Tensor  # (L, E) top-k counts
    coactivation: torch.Tensor  # (L, E, E) N(E_i, E_j) with the top k
    routed_counts: torch.Tensor  # (L, E) counts with the model's own K, for the load-balancing loss
    prob_sums: torch.Tensor  # (L, E) float64
    vocab_in: torch.Tensor  # (V, E) N(x, E_i) for input token x, in `layer`
    n_in: torch.Tensor  # (V,)
    vocab_out: torch.Tensor  # (V, E) N(y, E_i) for predicted next token y, in `layer`
    n_out: torch.Tensor  # (V,)
    shared: torch.Tensor | None = None  # (C, L) sum over tokens of experts shared with each compared checkpoint
    sample_ids: list = field(default_factory=list)  # the first tokens' ids
    sample_top1: torch.Tensor | None = None  # (L, S) their top-1 expert in each layer


def chunks(ids, chunk_len):
    """A long token stream as consecutive pieces the model can take (no longer than its context)."""
    return [ids[i:i + chunk_len] for i in range(0, len(ids), chunk_len)]


@torch.no_grad()
def route(model, ids, chunk_len, progress=None):
    """Run the token ids through the model chunk by chunk (prefill only: no cache, every chunk a fresh context).
    Yields, per chunk: the chunk's ids (n,), the router probabilities (L, n, E) in float32 as the router computes
    them, and the model's predicted next token at each position (n,)."""
    device = model.model.embed_tokens.weight.device
    for piece in chunks(ids, chunk_len):
        x = torch.tensor(piece, device=device)
        out = model(x[None])  # logits (1, n, V); router_logits: L x (1, n, E)
        probs = torch.stack([r[0].softmax(-1, dtype=torch.float32) for r in out.router_logits])  # (L, n, E)
        yield x, probs, out.logits[0].argmax(-1)  # argmax over the padded vocabulary rows too: they are real logits
        if progress is not None:
            progress.update(len(piece))


def collect(model, ids, k, *, layer=0, chunk_len=1024, compare=(), sample=32, progress=None) -> Stats:
    """One domain's Stats from its token ids (a list). compare: the (L, N, k) choices of other checkpoints on the
    same ids, for saturation. Memory stays that of one chunk, whatever the number of tokens."""
    c = model.config
    L, E, V, K = c.num_hidden_layers, c.num_experts, c.vocab_size, c.num_experts_per_tok
    def z(*shape):
        return torch.zeros(*shape, dtype=torch.long)

    s = Stats(len(ids), z(L, E), z(L, E, E), z(L, E), torch.zeros(L, E, dtype=torch.float64),
              z(V, E), z(V), z(V, E), z(V), shared=z(len(compare), L) if compare else None)
    start = 0
    for x, probs, predicted in route(model, ids, chunk_len, progress):
        choices = top_experts(probs, k)  # (L, n, k)
        s.expert_counts += balance.expert_counts(choices, E).cpu()
        s.coactivation += coactivation_counts(choices, E).cpu()
        s.routed_counts += balance.expert_counts(top_experts(probs, K), E).cpu()
        s.prob_sums += probs.sum(1).double().cpu()
        for counts, n, key in ((s.vocab_in, s.n_in, x), (s.vocab_out, s.n_out, predicted)):
            dc, dn = token_expert_counts(key, choices[layer], V, E)
            counts += dc.cpu()
            n += dn.cpu()
        for i, other in enumerate(compare):
            s.shared[i] += shared_experts(choices.cpu(), other[:, start:start + len(x)]).sum(-1)
        if start == 0:
            s.sample_ids, s.sample_top1 = x[:sample].tolist(), choices[:, :sample, 0].cpu()  # (L, S)
        start += len(x)
    return s


def choices_only(model, ids, k, *, chunk_len=1024, progress=None):
    """The (L, N, k) top-k choices of a model over the token ids, kept for comparing with another checkpoint."""
    return torch.cat([top_experts(probs, k).cpu() for _, probs, _ in route(model, ids, chunk_len, progress)], dim=1)


# --------------------------------------------------------------------------------------------------------------
# report.md and routing.json


def summary(stats: dict[str, Stats], k, K):
    """The ratios of the paper's analyses from the domains' counts: a dict of plain tensors."""
    total = sum(s.tokens for s in stats.values())
    counts = sum(s.expert_counts for s in stats.values())  # (L, E)
    routed = sum(s.routed_counts for s in stats.values())
    pooled, per_layer = balance.losses_from_counts(routed.double(), sum(s.prob_sums for s in stats.values()), total, K)
    co = sum(s.coactivation for s in stats.values())  # (L, E, E)
    out = dict(tokens=total, load=expert_load(counts), coactivation=coactivation(co),
               specialization={d: domain_specialization(s.expert_counts, s.tokens) for d, s in stats.items()},
               balance_loss_transformers=pooled.item(), balance_loss_per_layer=per_layer)
    if all(s.shared is not None for s in stats.values()):
        out["saturation"] = sum(s.shared for s in stats.values()) / (total * k)  # (C, L) Eq. 5 over all domains
    return out


def layer_figures(r):
    """One number per layer for each analysis, to read a trained model beside its untrained self: the largest
    expert's share of the pairs, the entropy of the experts' shares (bits; log2 E when balanced), the largest gap
    between two domains' shares of one expert (Eq. 7), and the largest co-activation of two experts (Eq. 6) among
    experts with at least half the balanced share of the pairs (an expert chosen 3 times can score 1 by chance)."""
    load = r["load"].double()  # (L, E)
    max_share, entropy = balance.load_summary(load)
    spec = torch.stack(list(r["specialization"].values()))  # (domains, L, E)
    co = r["coactivation"].clone()
    co.diagonal(dim1=1, dim2=2).fill_(0)
    co = co.masked_fill((load < 0.5 / load.shape[-1])[:, :, None], 0)  # rows of experts that carry little load
    return dict(max_share=max_share, entropy_bits=entropy,
                domain_gap=(spec.max(0).values - spec.min(0).values).max(-1).values,
                max_coactivation=co.flatten(1).max(-1).values, balance_loss=r["balance_loss_per_layer"])


def token_text(tokenizer, i):
    """A token id as readable, markdown-safe text: its decoded string in quotes."""
    text = tokenizer.decode([i]) if i < tokenizer.get_vocab_size() else f"<id {i}>"
    return "`" + repr(text)[1:-1].replace("`", "'").replace("|", "\\|") + "`"


def load_section(r, *, K):
    """report.md's load table: each layer's least- and most-used expert and its load-balancing loss, as lines."""
    L, E = r["load"].shape
    lines = ["", "## Load per layer", "",
             f"Each expert's share of the layer's token-expert pairs; perfect balance is 1/E = {1 / E:.4f}. The "
             "load-balancing loss per layer is normalised as MegaBlocks and OLMo-core do (uniform routing gives 1).",
             "", "| layer | least-used expert | most-used expert | max / min | experts never chosen | balance loss |",
             "|---|---|---|---|---|---|"]
    for l in range(L):
        row = r["load"][l]
        lo, hi = row.argmin().item(), row.argmax().item()
        ratio = f"{row[hi] / row[lo]:.2f}" if row[lo] > 0 else "inf"
        lines.append(f"| {l} | {lo} ({row[lo]:.4f}) | {hi} ({row[hi]:.4f}) | {ratio} | {(row == 0).sum().item()} "
                     f"| {r['balance_loss_per_layer'][l]:.3f} |")
    return lines + ["", f"Load-balancing loss as transformers computes it (all layers pooled, K = {K}): "
                    f"{r['balance_loss_transformers']:.3f}; uniform routing gives {K}."]


def domain_section(r, stats, *, k, top):
    """report.md's domain specialization table (Eq. 7): each domain's top experts beside the other domains'
    share of them, as lines."""
    L, E = r["load"].shape
    lines = ["", "## Experts specialised to each domain", "",
             f"Share of the domain's tokens with the expert in their top {k} (Eq. 7); uniform routing gives "
             f"k/E = {k / E:.3f}. The last column is the same share on the other domains' tokens.", "",
             "| domain | layer | expert | share of domain's tokens | x uniform | share of other tokens |",
             "|---|---|---|---|---|---|"]
    for d in stats:
        spec = r["specialization"][d]  # (L, E)
        others = [o for o in stats if o != d]
        rest = None
        if others:  # (L, E) the same share over the other domains' tokens, for contrast
            rest = sum(stats[o].expert_counts for o in others) / sum(stats[o].tokens for o in others)
        for v, flat in zip(*spec.flatten().topk(min(top, L * E))):
            l, e = divmod(flat.item(), E)
            other = f"{rest[l, e]:.3f}" if rest is not None else "—"
            lines.append(f"| {d} | {l} | {e} | {v:.3f} | {v / (k / E):.2f} | {other} |")
    return lines


def coactivation_section(r, stats, *, k, top):
    """report.md's table of the most co-activated pairs of experts (Eq. 6), as lines."""
    E = r["load"].shape[1]
    co = r["coactivation"].clone()
    co.diagonal(dim1=1, dim2=2).fill_(0)  # an expert always co-occurs with itself
    n_i = sum(s.coactivation for s in stats.values()).diagonal(dim1=1, dim2=2)  # (L, E)
    lines = ["", "## Most co-activated experts", "",
             f"N(E_i, E_j) / N(E_i) (Eq. 6): of the tokens that chose expert i, the share that also chose j, over "
             f"all pairs of each token's top {k}. Random routing gives (k-1)/(E-1) = {(k - 1) / (E - 1):.3f}.", "",
             "| layer | expert i | expert j | N(E_i, E_j) / N(E_i) | N(E_i) |", "|---|---|---|---|---|"]
    for v, flat in zip(*co.flatten().topk(min(2 * top, co.numel()))):
        l, ij = divmod(flat.item(), E * E)
        i, j = divmod(ij, E)
        lines.append(f"| {l} | {i} | {j} | {v:.3f} | {n_i[l, i].item()} |")
    return lines


def vocab_section(r, stats, tokenizer, *, k, layer, min_count, top):
    """report.md's vocabulary specialization table (Eq. 8): the input and the predicted next tokens each expert of
    the layer specialises in, as lines."""
    E = r["load"].shape[1]
    lines = ["", f"## Tokens each expert of layer {layer} specialises in", "",
             f"N(x, E_i) / N_x (Eq. 8): the share of token x's occurrences routed to the expert (top {k}), for ids "
             f"seen at least {min_count} times; input: the token itself, output: the token the model predicts "
             f"next (its argmax). Uniform routing gives k/E = {k / E:.3f}.", "",
             "| expert | input tokens (share, count) | output tokens (share, count) |", "|---|---|---|"]
    tables = []
    for counts, n in (("vocab_in", "n_in"), ("vocab_out", "n_out")):
        c, m = sum(getattr(s, counts) for s in stats.values()), sum(getattr(s, n) for s in stats.values())
        tables.append((vocab_specialization(c, m, min_count), m))  # share (V, E), occurrences (V,)
    for e in range(E):
        cells = []
        for share, m in tables:
            col = share[:, e].nan_to_num(-1.0)
            best = [(i, v) for v, i in zip(*col.topk(min(top, len(col)))) if v >= 0]
            cells.append(", ".join(f"{token_text(tokenizer, i.item())} ({v:.2f}, {m[i].item()})" for i, v in best)
                         or f"— (no id seen {min_count} times)")
        lines.append(f"| {e} | {cells[0]} | {cells[1]} |")
    return lines


def saturation_section(r, *, compare_label, k):
    """report.md's router saturation table (Eq. 5): one row per compared checkpoint, one column per layer, as
    lines."""
    L, E = r["load"].shape
    lines = ["", "## Router saturation against other checkpoints", "",
             f"Mean over tokens of |E(x; compared) ∩ E(x; this)| / k with k = {k} (Eq. 5): how much of each "
             f"token's top {k} the two checkpoints agree on. Random routing gives k/E = {k / E:.3f}.", "",
             "| compared checkpoint | " + " | ".join(f"layer {l}" for l in range(L)) + " |",
             "|---|" + "---|" * L]
    return lines + [f"| {name} | " + " | ".join(f"{v:.3f}" for v in row) + " |"
                    for name, row in zip(compare_label, r["saturation"].tolist())]


def training_section(rb, r, *, baseline_label, K):
    """report.md's 'what training did' table: each layer's figures (layer_figures) of the untrained model rb →
    this one r, then the pooled load-balancing loss, as lines."""
    L, E = r["load"].shape
    b, a = layer_figures(rb), layer_figures(r)
    lines = ["", f"## What training did: {baseline_label} → this checkpoint", "",
             "The same analyses of the untrained model on the same tokens. Random routers are already lopsided, "
             "so only the change says what training did. Per layer: the largest expert's share of the pairs "
             f"(balanced: 1/E = {1 / E:.4f}), the entropy of the experts' shares (balanced: log2 E = "
             f"{math.log2(E):.2f} bits), the load-balancing loss per layer (balanced: 1), the largest gap "
             f"between two domains' shares of one expert (Eq. 7), and the largest co-activation (Eq. 6) of an "
             "expert with at least half the balanced share.", "",
             "| layer | largest share | entropy (bits) | balance loss | largest domain gap "
             "| largest co-activation |", "|---|---|---|---|---|---|"]
    for l in range(L):
        lines.append(f"| {l} | " + " | ".join(f"{b[key][l]:.3f} → {a[key][l]:.3f}" for key in
                     ("max_share", "entropy_bits", "balance_loss", "domain_gap", "max_coactivation")) + " |")
    return lines + ["", f"Load-balancing loss as transformers computes it (pooled, K = {K} when balanced): "
                    f"{rb['balance_loss_transformers']:.3f} → {r['balance_loss_transformers']:.3f}; the per-layer "
                    f"convention above averages to {rb['balance_loss_per_layer'].mean():.3f} → "
                    f"{r['balance_loss_per_layer'].mean():.3f}."]


def report(stats, tokenizer, *, label, compare_label, k, K, layer, min_count=10, top=5, baseline=None,
           baseline_label=None) -> str:
    """report.md: the tables, each with the baseline it should be read against. baseline: the Stats of the same
    model untrained on the same tokens, read beside this one in a table of its own."""
    r = summary(stats, k, K)
    L, E = r["load"].shape
    lines = [f"# Routing report: {label}", "",
             f"{r['tokens']} tokens ({', '.join(f'{d}: {s.tokens}' for d, s in stats.items())}); {L} layers of {E} "
             f"experts; the model routes each token to K = {K}; these statistics count each token's top k = {k} "
             f"by router probability."]
    lines += load_section(r, K=K)
    lines += domain_section(r, stats, k=k, top=top)
    lines += coactivation_section(r, stats, k=k, top=top)
    lines += vocab_section(r, stats, tokenizer, k=k, layer=layer, min_count=min_count, top=top)
    if "saturation" in r:
        lines += saturation_section(r, compare_label=compare_label, k=k)
    if baseline is not None:
        lines += training_section(summary(baseline, k, K), r, baseline_label=baseline_label, K=K)
    return "\n".join(lines) + "\n"


def raw_json(stats, *, label, compare_label, k, K, layer, baseline=None, baseline_label=None):
    """routing.json: the raw counts, from which every number in the report can be recomputed."""
    r = summary(stats, k, K)
    L, E = r["load"].shape
    out = dict(checkpoint=label, layers=L, experts=E, top_k=k, experts_per_token=K, vocab_layer=layer,
               tokens={d: s.tokens for d, s in stats.items()},
               expert_counts={d: s.expert_counts.tolist() for d, s in stats.items()},  # [domain][layer][expert]
               coactivation=sum(s.coactivation for s in stats.values()).tolist(),  # [layer][i][j] = N(E_i, E_j)
               balance_loss_transformers=r["balance_loss_transformers"],
               balance_loss_per_layer=r["balance_loss_per_layer"].tolist())
    if "saturation" in r:  # [compared checkpoint][layer]
        out.update(compare_checkpoints=compare_label, saturation=r["saturation"].tolist())
    if baseline is not None:
        out["baseline"] = raw_json(baseline, label=baseline_label, compare_label=None, k=k, K=K, layer=layer)
    return out


# --------------------------------------------------------------------------------------------------------------
# Figures (matplotlib, optional)


def coactivation_figure(co, layer, k, source):
    """One layer's co-activation (E, E) as a heat map, its diagonal blank."""
    import matplotlib.pyplot as plt

    co = co.clone()
    co.fill_diagonal_(float("nan"))  # always 1: hide it so the off-diagonal pairs get the colour range
    fig, ax = plt.subplots(figsize=(6.5, 5.5), layout="constrained")
    im = ax.imshow(co.numpy(), cmap="magma", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="N(E_i, E_j) / N(E_i)")
    ax.set(xlabel="expert j (also chosen)", ylabel="expert i",
           title=f"Expert co-activation (Eq. 6), layer {layer}, top {k}\n" + textwrap.fill(
               "Of the tokens that chose expert i, the share that also chose j. The diagonal is blank: an expert "
               "always co-occurs with itself.", 80) + f"\n{source}")
    ax.title.set_fontsize(9)
    return fig


def shown_layers(L):
    """The layers the per-layer figures show: the first, the middle one and the last."""
    return sorted({0, L // 2, L - 1})


def load_figure(load, k, source):
    """Each layer's load per expert (L, E), relative to a balanced one, as a heat map."""
    import matplotlib.pyplot as plt

    L, E = load.shape
    fig, ax = plt.subplots(figsize=(min(max(6.5, 3 + E * 0.18), 16), max(3.2, 1.5 + L * 0.3)), layout="constrained")
    im = ax.imshow((load * E).numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="share of pairs ÷ 1/E\n(1 = balanced)")
    ax.set(xlabel="expert", ylabel="layer", title=f"Load per expert (top {k})\n{source}")
    ax.set_yticks(range(0, L, 1 if L <= 24 else 2))
    return fig


def domains_figure(specialization, k, source):
    """Each domain's specialization {domain: (L, E)} as one line over the experts, in the first, middle and last
    layer."""
    import matplotlib.pyplot as plt

    L, E = next(iter(specialization.values())).shape
    shown = shown_layers(L)
    fig, axes = plt.subplots(len(shown), 1, figsize=(min(4 + E * 0.15, 16), 2.2 * len(shown) + 1),
                             sharex=True, squeeze=False, layout="constrained")
    for ax, l in zip(axes[:, 0], shown):
        for d, spec in specialization.items():
            ax.plot(range(E), spec[l].numpy(), marker="o", markersize=3, linewidth=0.8, label=d)
        ax.axhline(k / E, color="gray", linestyle="--", linewidth=1, label=f"uniform k/E = {k / E:.2f}")
        ax.set(ylabel=f"layer {l}\nshare of tokens", ylim=(0, 1.02))
    axes[-1, 0].set_xlabel("expert")
    axes[0, 0].legend(loc="upper right", fontsize=8, ncol=len(specialization) + 1)
    fig.suptitle(f"Domain specialization (Eq. 7): share of each domain's tokens with the expert in their top {k}\n"
                 f"{source}", fontsize=10)
    return fig


def tokens_figure(stats, tokenizer, label):
    """The top-1 expert of the first domain's first tokens in each layer, as a grid of expert ids."""
    import matplotlib.pyplot as plt

    d, s = next(iter(stats.items()))
    L, E = s.expert_counts.shape
    S = len(s.sample_ids)
    top1 = s.sample_top1.T  # (S, L)
    fig, ax = plt.subplots(figsize=(max(6.5, 3 + 0.28 * L), 1.5 + 0.22 * S), layout="constrained")
    cmap = plt.get_cmap("tab20" if E <= 20 else "nipy_spectral")
    ax.imshow(top1.numpy(), aspect="auto", cmap=cmap, vmin=0, vmax=E - 1, interpolation="nearest")
    for t in range(S):
        for l in range(L):
            e = top1[t, l].item()
            r, g, b, _ = cmap(e / max(E - 1, 1))
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.55  # white text on dark cells, black on light ones
            ax.text(l, t, str(e), ha="center", va="center", fontsize=6, color="white" if dark else "black")
    ax.set_yticks(range(S), [token_text(tokenizer, i).strip("`") for i in s.sample_ids], fontsize=7)
    ax.set_xticks(range(L))
    ax.set(xlabel="layer", ylabel=f"token (first {S} of {d})",
           title=f"Top-1 expert of each token in each layer\n{textwrap.fill(label, 80)}")
    ax.title.set_fontsize(9)
    return fig


def specialization_figure(panels, domains, *, k, tokens):
    """Specialization as heat maps, domains x experts, one column per (name, summary) panel and one row per layer
    shown, each layer's experts sorted by the domain they favour most."""
    import matplotlib.pyplot as plt

    L, E = panels[0][1]["load"].shape
    shown = shown_layers(L)
    fig, axes = plt.subplots(len(shown), len(panels), figsize=(6 * len(panels), 1.2 + 1.1 * len(shown) * len(domains)),
                             squeeze=False, layout="constrained")
    for col, (name, rr) in enumerate(panels):
        for row, l in enumerate(shown):
            spec = torch.stack([rr["specialization"][d][l] for d in domains]) / (k / E)  # (domains, E), 1 = uniform
            order = sorted(range(E), key=lambda e: (spec[:, e].argmax().item() if spec[:, e].any() else len(domains),
                                                    -spec[:, e].max().item()))  # unchosen experts last
            im = axes[row, col].imshow(spec[:, order].clamp(min=1 / 8).log2().numpy(), aspect="auto", cmap="RdBu_r",
                                       vmin=-3, vmax=3, interpolation="nearest")
            axes[row, col].set_yticks(range(len(domains)), domains)
            axes[row, col].set(title=f"{textwrap.shorten(name, 60)}: layer {l}", xlabel=(
                "experts, sorted by the domain they favour" if row == len(shown) - 1 else None))
            axes[row, col].title.set_fontsize(9)
    fig.colorbar(im, ax=axes, label="share of the domain's tokens ÷ uniform k/E\n"
                                    "(log2: 0 = uniform, 3 = 8x, -3 = 1/8 or less)")
    title = f"Domain specialization (Eq. 7), top {k}: {tokens} tokens of {', '.join(domains)}\n"
    fig.suptitle(title + textwrap.fill(
        f"A cell is red when the row's domain sends its tokens to that expert more often than if the router picked "
        f"{k} of the {E} experts at random, blue when less often, white when as often.", 55 * len(panels)),
        fontsize=10)
    return fig


def saturation_figure(saturation, *, E, k, label, compare_label, compare_tokens):
    """Router saturation (C, L) against each compared checkpoint, one line per layer: over the tokens the compared
    checkpoints trained on when all of them say, else one named tick per checkpoint."""
    import matplotlib.pyplot as plt

    x = compare_tokens if compare_tokens and None not in compare_tokens else list(range(len(compare_label)))
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    for l, ys in enumerate(saturation.T.tolist()):
        ax.plot(x, ys, marker=".", label=f"layer {l}")
    ax.axhline(k / E, color="gray", linestyle="--", linewidth=1, label=f"random routing, k/E = {k / E:.2f}")
    if x is not compare_tokens:  # no token counts: one tick per compared checkpoint, named
        ax.set_xticks(x, [textwrap.shorten(str(c), 30) for c in compare_label], rotation=30, ha="right", fontsize=7)
    ax.set(xlabel="tokens trained by the compared checkpoint" if x is compare_tokens else "compared checkpoint",
           ylabel=f"saturation: share of top-{k} experts\nshared with this checkpoint", ylim=(0, 1.02),
           title=f"Router saturation (Eq. 5) against\n{textwrap.shorten(label, 80)}")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    return fig


def figures(stats, tokenizer, *, label, k, K, layer, compare_label=None, compare_tokens=None, baseline=None,
            baseline_label=None):
    """The pictures, as {file name: matplotlib Figure}. Each says which checkpoint and which tokens it shows."""
    r = summary(stats, k, K)
    source = textwrap.fill(f"{label}; {r['tokens']} tokens of {', '.join(stats)}", 80)  # which data, on every figure
    # Specialization beside the untrained model when there is one, since random routers favour some experts too.
    panels = [(f"baseline {baseline_label}", summary(baseline, k, K))] if baseline is not None else []
    figs = {"load.png": load_figure(r["load"], k, source),
            "domains.png": domains_figure(r["specialization"], k, source),
            "coactivation.png": coactivation_figure(r["coactivation"][layer], layer, k, source),
            "tokens.png": tokens_figure(stats, tokenizer, label),
            "specialization.png": specialization_figure(panels + [(label, r)], list(stats), k=k, tokens=r["tokens"])}
    if "saturation" in r:  # Eq. 5 of each compared checkpoint, over training when their token counts are known
        figs["saturation.png"] = saturation_figure(r["saturation"], E=r["load"].shape[1], k=k, label=label,
                                                   compare_label=compare_label, compare_tokens=compare_tokens)
    return figs


# --------------------------------------------------------------------------------------------------------------
# Command line


def token_ids(specs, tokenizer, max_tokens):
    """--text NAME=FILE arguments -> {name: token ids}, each cut to max_tokens."""
    texts = {}
    for (name, t), spec in zip(text.read_texts(specs).items(), specs):
        ids = tokenizer.encode(t, add_special_tokens=False).ids
        if not ids:
            raise ValueError(f"--text {spec!r}: no tokens to route")
        texts[name] = ids[:max_tokens] if max_tokens else ids
    return texts


def moe_config(checkpoint):
    """The checkpoint's directory and config, or a clear error for a model without a router."""
    path = checkpoints.checkpoint_dir(checkpoint)
    config, _ = variants.read_config(path)  # a train.py run of a variant too
    if config.model_type != "olmoe":
        raise ValueError(f"{checkpoint}: a {config.model_type} checkpoint has no router to analyse "
                         "(expected an OLMoE checkpoint)")
    return path, config


def checked_chunk_len(args, config):
    """--chunk-len capped at the model's context, once --top-k, --layer and --chunk-len are checked against the
    checkpoint's config (a clear error for each)."""
    E, L = config.num_experts, config.num_hidden_layers
    if not 1 <= args.top_k <= E:
        raise ValueError(f"--top-k {args.top_k}: expected 1 to {E}, the number of experts per layer")
    if not 0 <= args.layer < L:
        raise ValueError(f"--layer {args.layer}: expected 0 to {L - 1}")
    chunk_len = min(args.chunk_len, config.max_position_embeddings)
    if chunk_len < 1:
        raise ValueError(f"--chunk-len {args.chunk_len}: expected at least 1")
    return chunk_len


def load_like(checkpoint, flag, config, *, device, dtype):
    """Another checkpoint of the same model as config's (its layers and experts, or a clear error naming the flag
    that gave it), loaded: (model, its directory)."""
    other_path, other_config = moe_config(checkpoint)
    L, E = config.num_hidden_layers, config.num_experts
    if (other_config.num_hidden_layers, other_config.num_experts) != (L, E):
        raise ValueError(f"{flag} {checkpoint}: has {other_config.num_hidden_layers} layers of "
                         f"{other_config.num_experts} experts, expected {L} of {E} like --checkpoint")
    return variants.load_model(other_path, device=device, dtype=dtype, moe_dispatch="batched"), other_path


def domain_stats(model, texts, *, k, layer, chunk_len, desc, compare=None):
    """{domain: Stats} of the model over each domain's token ids; compare: {domain: [(L, N, k) choices of each
    compared checkpoint]}. A progress bar named desc on stderr."""
    bar = tqdm(total=sum(map(len, texts.values())), desc=desc, unit="tok", file=sys.stderr, leave=False)
    stats = {d: collect(model, ids, k, layer=layer, chunk_len=chunk_len, progress=bar,
                        compare=compare[d] if compare else ()) for d, ids in texts.items()}
    bar.close()
    return stats


def compared_choices(checkpoints, texts, *, config, device, dtype, k, chunk_len):
    """Each --compare-checkpoint's routing of the texts, and the tokens it was trained on where train.py says so:
    ({domain: [(L, N, k) choices, one per checkpoint]}, [tokens or None, one per checkpoint])."""
    total = sum(map(len, texts.values()))
    compare, compare_tokens = {d: [] for d in texts}, []
    for checkpoint in checkpoints:  # one model in memory at a time: two OLMoE-1B-7B in bf16 take 28 GB
        other, other_path = load_like(checkpoint, "--compare-checkpoint", config, device=device, dtype=dtype)
        bar = tqdm(total=total, desc=f"compared {checkpoint}", unit="tok", file=sys.stderr, leave=False)
        for d, ids in texts.items():
            compare[d].append(choices_only(other, ids, k, chunk_len=chunk_len, progress=bar))
        bar.close()
        del other
        state = other_path / "trainer_state.json"  # train.py's checkpoints say how many tokens they were trained on
        compare_tokens.append(json.loads(state.read_text())["tokens"] if state.is_file() else None)
    return compare, compare_tokens


def write_outputs(out, stats, tokenizer, *, compare_tokens, **kw):
    """report.md, routing.json and (when matplotlib is installed) the figures, written to the directory out; kw:
    report's keyword arguments. Returns nothing."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report(stats, tokenizer, **kw))
    (out / "routing.json").write_text(json.dumps(raw_json(stats, **kw)))
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no window
    except ImportError:
        print("note: matplotlib is not installed, so no figures were drawn (pip install matplotlib)", file=sys.stderr)
        return
    for name, fig in figures(stats, tokenizer, compare_tokens=compare_tokens, **kw).items():
        fig.savefig(out / name, dpi=110)
    total = sum(s.tokens for s in stats.values())
    print(f"wrote {out / 'report.md'}, routing.json and figures for {total} tokens", file=sys.stderr)


def run(args):
    device = devices.pick_device(args.device)
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens {args.max_tokens}: expected at least 1")
    path, config = moe_config(args.checkpoint)
    dtype = devices.pick_dtype(args.dtype, device, config)
    chunk_len = checked_chunk_len(args, config)
    tokenizer, _, _ = checkpoints.load_tokenizer(path)
    texts = token_ids(args.text, tokenizer, args.max_tokens)

    compare, compare_tokens = compared_choices(args.compare_checkpoint, texts, config=config, device=device,
                                               dtype=dtype, k=args.top_k, chunk_len=chunk_len)
    baseline = None
    if args.baseline:  # the untrained model, gone from memory before this one loads
        other, _ = load_like(args.baseline, "--baseline", config, device=device, dtype=dtype)
        baseline = domain_stats(other, texts, k=args.top_k, layer=args.layer, chunk_len=chunk_len, desc="baseline")
        del other

    model = variants.load_model(path, device=device, dtype=dtype, moe_dispatch="batched")
    stats = domain_stats(model, texts, k=args.top_k, layer=args.layer, chunk_len=chunk_len, desc="routing",
                         compare=compare)
    write_outputs(Path(args.out), stats, tokenizer, compare_tokens=compare_tokens,
                  label=args.label or args.checkpoint, k=args.top_k, K=config.num_experts_per_tok, layer=args.layer,
                  compare_label=args.compare_checkpoint, baseline=baseline, baseline_label=args.baseline)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="OLMoE checkpoint: local directory or Hub id")
    p.add_argument("--text", action="append", required=True, metavar="NAME=FILE",
                   help="a domain's name and a text file of it; repeat for several domains")
    p.add_argument("--compare-checkpoint", action="append", default=[], metavar="ID_OR_DIR",
                   help="another checkpoint of the same model (e.g. from earlier in training): adds router saturation; "
                   "repeat it for a curve over training")
    p.add_argument("--baseline", default=None, metavar="ID_OR_DIR", help="the same model untrained (train.py's "
                   "step-000000): every analysis beside it")
    p.add_argument("--top-k", type=int, default=8, help="experts counted per token, ranked by router probability")
    p.add_argument("--max-tokens", type=int, default=None, help="at most this many tokens of each text")
    p.add_argument("--layer", type=int, default=0, help="layer whose experts' favourite tokens the report lists")
    p.add_argument("--chunk-len", type=int, default=1024, help="tokens per forward pass (at most the context)")
    p.add_argument("--label", default=None, help="how the report and figures name the checkpoint")
    p.add_argument("--device", default=None, help="default: cuda, else mps, else cpu")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16; default: the checkpoint's own, as "
                   "generate.py")
    p.add_argument("--out", required=True, help="directory for report.md, routing.json and the figures")
    cli.run(run, p.parse_args(argv))


if __name__ == "__main__":
    main()
