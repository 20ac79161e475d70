"""Tests for routing.py and tour.ipynb: the analyses on routings small enough to count by hand, then the command
line and the notebook on a small random checkpoint."""

import collections
import contextlib
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch

import balance
import olmoe
import routing
from conftest import gen_checkpoint, importorskip

# One layer, 4 tokens, each choosing k = 2 of E = 4 experts (most probable first).
CHOICES = torch.tensor([[[0, 1], [0, 2], [1, 0], [3, 2]]])  # (L=1, N=4, k=2)


def test_expert_counts_and_load_count_token_expert_pairs():
    # expert 0: tokens 0, 1, 2; expert 1: tokens 0, 2; expert 2: tokens 1, 3; expert 3: token 3
    assert balance.expert_counts(CHOICES, 4).tolist() == [[3, 2, 2, 1]]
    # shares of the 4 * 2 = 8 pairs: 3/8, 2/8, 2/8, 1/8
    assert routing.expert_load(balance.expert_counts(CHOICES, 4)).tolist() == [[0.375, 0.25, 0.25, 0.125]]
    two_layers = torch.tensor([CHOICES[0].tolist(), [[3, 2], [3, 1], [2, 3], [1, 2]]])
    # layer 1: expert 1: tokens 1, 3; expert 2: tokens 0, 2, 3; expert 3: tokens 0, 1, 2
    assert balance.expert_counts(two_layers, 4).tolist() == [[3, 2, 2, 1], [0, 2, 3, 3]]


def test_coactivation_is_share_of_an_experts_tokens_that_also_chose_the_other():
    # token pairs: {0,1}, {0,2}, {0,1}, {2,3}. N(0,1) = 2, N(0,2) = 1, N(2,3) = 1, N(1,2) = N(1,3) = N(0,3) = 0;
    # the diagonal is N(E_i): 3, 2, 2, 1.
    counts = routing.coactivation_counts(CHOICES, 4)
    assert counts.tolist() == [[[3, 2, 1, 0],
                                [2, 2, 0, 0],
                                [1, 0, 2, 1],
                                [0, 0, 1, 1]]]
    share = routing.coactivation(counts)[0]
    # N(0,1)/N(0) = 2/3; N(1,0)/N(1) = 2/2; N(2,3)/N(2) = 1/2; N(3,2)/N(3) = 1/1: not symmetric
    assert abs(share[0, 1].item() - 2 / 3) < 1e-6 and share[1, 0] == 1.0 and share[2, 3] == 0.5 and share[3, 2] == 1.0
    assert share.diagonal().tolist() == [1.0, 1.0, 1.0, 1.0]


def test_coactivation_counts_all_pairs_not_only_adjacent_ones():
    # one token with top 3 = [0, 1, 2]: pairs (0,1), (1,2) are adjacent in the sorted top k, (0,2) is not but counts
    counts = routing.coactivation_counts(torch.tensor([[[0, 1, 2]]]), 3)
    assert counts[0].tolist() == [[1, 1, 1], [1, 1, 1], [1, 1, 1]]


def test_saturation_is_the_mean_share_of_top_k_experts_two_checkpoints_share():
    later = torch.tensor([[[1, 0], [2, 3], [1, 2], [0, 1]]])
    # shared per token: {0,1}&{0,1} = 2, {0,2}&{2,3} = 1, {1,0}&{1,2} = 1, {3,2}&{0,1} = 0 -> (2+1+1+0) / (4*2)
    assert routing.shared_experts(CHOICES, later).tolist() == [[2, 1, 1, 0]]
    assert routing.saturation(CHOICES, later).tolist() == [0.5]
    assert routing.saturation(CHOICES, CHOICES).tolist() == [1.0]


def test_domain_specialization_is_share_of_the_domains_tokens():
    # expert 0 is in the top 2 of 3 of the 4 tokens; uniform routing would give k/E = 2/4
    spec = routing.domain_specialization(balance.expert_counts(CHOICES, 4), 4)
    assert spec.tolist() == [[0.75, 0.5, 0.5, 0.25]]


def test_vocab_specialization_keys_on_token_ids_and_drops_rare_ones():
    ids = torch.tensor([5, 5, 7, 5])  # token 5 at positions 0, 1, 3; token 7 once
    counts, n = routing.token_expert_counts(ids, CHOICES[0], V=8, E=4)
    # token 5's experts: {0,1}, {0,2}, {3,2} -> expert 0 twice, 1 once, 2 twice, 3 once
    assert counts[5].tolist() == [2, 1, 2, 1] and counts[7].tolist() == [1, 1, 0, 0]
    assert n.tolist() == [0, 0, 0, 0, 0, 3, 0, 1]
    share = routing.vocab_specialization(counts, n, min_count=2)
    assert torch.allclose(share[5], torch.tensor([2 / 3, 1 / 3, 2 / 3, 1 / 3]))
    assert share[7].isnan().all() and share[0].isnan().all()  # seen once, and never: below min_count
    assert not routing.vocab_specialization(counts, n, min_count=1)[7].isnan().any()


def test_layer_figures_by_hand():
    # E = 4, one layer; two domains of 2 tokens each, k = 2
    # prose: tokens choose {0, 1}, {0, 1}; code: {0, 2}, {3, 2}
    prose, code = torch.tensor([[[0, 1], [0, 1]]]), torch.tensor([[[0, 2], [3, 2]]])
    stats = {d: routing.Stats(2, balance.expert_counts(c, 4), routing.coactivation_counts(c, 4),
                              balance.expert_counts(c, 4), torch.full((1, 4), 0.5, dtype=torch.float64),
                              *[None] * 4) for d, c in (("prose", prose), ("code", code))}
    f = routing.layer_figures(routing.summary(stats, k=2, K=2))
    # pairs per expert [3, 2, 2, 1] of 8 -> shares [3/8, 1/4, 1/4, 1/8]
    assert f["max_share"].tolist() == [0.375]
    assert abs(f["entropy_bits"].item() - -(3 / 8 * math.log2(3 / 8) + 2 / 4 * math.log2(1 / 4) + 1 / 8 * math.log2(
        1 / 8))) < 1e-9
    # domain shares: prose [1, 1, 0, 0], code [1/2, 0, 1, 1/2] -> largest gap 1 (experts 1 and 2)
    assert f["domain_gap"].tolist() == [1.0]
    # co-activation N(Ei, Ej) / N(Ei): expert 1 chose with 0 on both its tokens -> 1; expert 3 with 2 -> 1
    assert f["max_coactivation"].tolist() == [1.0]


def test_top_experts_rank_by_probability_for_any_k():
    probs = torch.tensor([[[0.1, 0.5, 0.15, 0.25]]])  # (L=1, N=1, E=4)
    assert routing.top_experts(probs, 1).tolist() == [[[1]]]
    assert routing.top_experts(probs, 3).tolist() == [[[1, 3, 2]]]


# --------------------------------------------------------------------------------------------------------------
# The command line, in this process, against an oracle: the same tokens run through the model directly, its router
# logits read and counted by plain loops here

TEXTS = {"prose": "the quick brown fox jumps over the lazy dog. " * 6, "accents": "café naïve 日本語 " * 12}


@pytest.fixture(scope="module")
def routing_checkpoint(tmp_path_factory, tokenizer_json):
    return gen_checkpoint(tmp_path_factory.mktemp("routing-ckpt"), tokenizer_json)[1]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_json):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_json))


def write_texts(tmp_path, texts=TEXTS):
    files = []
    for name, text in texts.items():
        (tmp_path / f"{name}.txt").write_text(text)
        files += ["--text", f"{name}={tmp_path / f'{name}.txt'}"]
    return files


@contextlib.contextmanager
def kept_figures(draw=True, save=True):
    """routing.figures wrapped so that the test can read the data each figure shows; draw=False skips drawing
    them, save=False writing them (each a second or so of matplotlib), in tests about other things."""
    kept, original = {}, routing.figures
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(routing, "figures", lambda *a, **kw: kept.update(original(*a, **kw) if draw else {}) or kept)
        if not save:
            import matplotlib.figure

            mp.setattr(matplotlib.figure.Figure, "savefig", lambda *a, **kw: None)
        yield kept
    if kept:
        import matplotlib.pyplot as plt

        for fig in kept.values():
            plt.close(fig)


def direct_routing(checkpoint, ids, k, chunk, dtype=torch.float32):
    """The oracle's model run: the ids in the same chunks (each a fresh context), read from the router logits:
    each token's k most probable experts (L, N, k), the router probabilities (L, N, E) and the argmax next
    token (N,)."""
    model = olmoe.load_model(checkpoint, dtype=dtype)
    choices, probs, predicted = [], [], []
    for start in range(0, len(ids), chunk):
        with torch.no_grad():
            out = model(torch.tensor([ids[start:start + chunk]]))
        p = torch.stack([r[0].float().softmax(-1) for r in out.router_logits])  # (L, n, E)
        choices.append(p.topk(k).indices)
        probs.append(p)
        predicted.append(out.logits[0].argmax(-1))
    return torch.cat(choices, 1), torch.cat(probs, 1), torch.cat(predicted)


def count_by_hand(choices, E):
    """N(E_i) (L, E) and N(E_i, E_j) (L, E, E), by plain loops over each layer's tokens."""
    L = choices.shape[0]
    n, co = torch.zeros(L, E, dtype=torch.long), torch.zeros(L, E, E, dtype=torch.long)
    for l, layer in enumerate(choices.tolist()):
        for experts in layer:
            for i in experts:
                n[l, i] += 1
                for j in experts:
                    co[l, i, j] += 1
    return n, co


def per_layer_balance_loss(routed, prob_sums, N, K):
    """MegaBlocks' normalised loss per layer, written out: E * sum_e (N(E_e) / (N K)) * (mean probability of e)."""
    E = routed.shape[-1]
    return [E * sum(routed[l, e].item() / (N * K) * prob_sums[l, e].item() / N for e in range(E))
            for l in range(routed.shape[0])]


def token_shares(keys, choices, E=8, min_count=10):
    """Eq. 8 by hand for one layer: {token id: (share of its occurrences with expert e in the top k, for each e;
    occurrences)} for the ids seen at least min_count times. keys: a token id per position; choices: (N, k)."""
    seen = collections.Counter(keys)
    hits = collections.Counter((x, e) for x, experts in zip(keys, choices.tolist()) for e in experts)
    return {x: ([hits[x, e] / n for e in range(E)], n) for x, n in seen.items() if n >= min_count}


def rendered(tokenizer, i):
    """How the report shows a token: its decoded text, repr-escaped, in backticks (ids past the tokenizer's
    vocabulary, the padded rows, as <id N>)."""
    text = tokenizer.decode([i]) if i < tokenizer.get_vocab_size() else f"<id {i}>"
    return "`" + repr(text)[1:-1].replace("`", "'").replace("|", "\\|") + "`"


def table(report, heading):
    """The body rows of the markdown table in the report's section whose heading starts with `heading`, as lists
    of cells."""
    lines = report.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("## " + heading))
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        if line.startswith("| ") and not line.startswith("|---"):
            rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    assert rows, f"no table under {heading!r}"
    return rows[1:]  # without the header


def printed(cell, value, digits):
    """The cell is the value printed with that many decimals: within half a unit of its last digit."""
    return float(cell) == pytest.approx(float(value), abs=0.5 * 10 ** -digits + 1e-7)


LAB = dict(k=3, chunk=16, max_tokens=150, layer=1, label="tiny random OLMoE (seed 0)")


@pytest.fixture(scope="module")
def lab(tmp_path_factory, routing_checkpoint, tokenizer_json, tokenizer):
    """routing.py run once, every flag away from its default: top k = 3 (the model's K is 2), chunks of 16 tokens,
    150 tokens of each text (3 times TEXTS, so that some token ids occur 10 times), the token tables of layer 1,
    saturation against a second random checkpoint, a label. Beside it the oracle's routing of the same tokens."""
    d = tmp_path_factory.mktemp("lab")
    _, other = gen_checkpoint(d / "other", tokenizer_json, seed=1)
    texts = {name: text * 3 for name, text in TEXTS.items()}
    with kept_figures() as figs:
        routing.main(["--checkpoint", str(routing_checkpoint), *write_texts(d, texts), "--top-k", str(LAB["k"]),
                      "--chunk-len", str(LAB["chunk"]), "--max-tokens", str(LAB["max_tokens"]), "--layer",
                      str(LAB["layer"]), "--label", LAB["label"], "--compare-checkpoint", str(other), "--device",
                      "cpu", "--out", str(d / "out")])
        ids = {name: tokenizer.encode(text, add_special_tokens=False).ids for name, text in texts.items()}
        assert all(len(i) > LAB["max_tokens"] for i in ids.values())  # so --max-tokens cuts both
        ids = {name: i[:LAB["max_tokens"]] for name, i in ids.items()}
        direct = {name: direct_routing(routing_checkpoint, i, LAB["k"], LAB["chunk"]) for name, i in ids.items()}
        routed = {name: direct_routing(routing_checkpoint, i, 2, LAB["chunk"])[0] for name, i in ids.items()}
        compared = {name: direct_routing(other, i, LAB["k"], LAB["chunk"])[0] for name, i in ids.items()}
        yield SimpleNamespace(out=d / "out", raw=json.loads((d / "out" / "routing.json").read_text()),
                              report=(d / "out" / "report.md").read_text(), figs=figs, ids=ids, direct=direct,
                              routed=routed, compared=compared, other=other, checkpoint=routing_checkpoint)


def test_cli_counts_equal_a_direct_count_from_router_logits(lab):
    raw = lab.raw
    assert (raw["layers"], raw["experts"], raw["top_k"], raw["experts_per_token"]) == (2, 8, 3, 2)
    coact = torch.zeros(2, 8, 8, dtype=torch.long)
    for name, (choices, _, _) in lab.direct.items():
        assert raw["tokens"][name] == LAB["max_tokens"]
        counts, co = count_by_hand(choices, 8)
        assert raw["expert_counts"][name] == counts.tolist()
        coact += co
    assert raw["coactivation"] == coact.tolist()


def test_load_table_and_balance_losses_equal_a_direct_computation(lab):
    """The load table's columns, the per-layer balance loss (MegaBlocks' convention, a formula written here) and the
    pooled one (transformers' own load_balancing_loss_func on the same router probabilities), in report and JSON."""
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

    N = 2 * LAB["max_tokens"]
    counts = sum(count_by_hand(c, 8)[0] for c, _, _ in lab.direct.values())  # top 3
    routed = sum(count_by_hand(c, 8)[0] for c in lab.routed.values())  # the model's K = 2
    probs = torch.cat([p for _, p, _ in lab.direct.values()], 1)  # (L, N, E), both domains
    per_layer = per_layer_balance_loss(routed, probs.sum(1), N, K=2)
    pooled = load_balancing_loss_func(tuple(probs.log()), 8, 2).item()  # log: it takes logits and softmaxes them
    assert lab.raw["balance_loss_per_layer"] == pytest.approx(per_layer, rel=1e-5)
    assert lab.raw["balance_loss_transformers"] == pytest.approx(pooled, rel=1e-5)
    rows = table(lab.report, "Load per layer")
    assert len(rows) == 2
    for l, (layer, least, most, ratio, never, loss) in enumerate(rows):
        share = counts[l] / (N * LAB["k"])
        (lo, lo_share), (hi, hi_share) = (re.fullmatch(r"(\d+) \(([\d.]+)\)", c).groups() for c in (least, most))
        assert layer == str(l) and share[int(lo)] == share.min() and share[int(hi)] == share.max()
        assert printed(lo_share, share.min(), 4) and printed(hi_share, share.max(), 4)
        assert ratio == "inf" if share.min() == 0 else printed(ratio, share.max() / share.min(), 2)
        assert never == str((counts[l] == 0).sum().item()) and printed(loss, per_layer[l], 3)
    line = re.search(r"Load-balancing loss as transformers computes it \(all layers pooled, K = 2\): ([\d.]+)",
                     lab.report)
    assert printed(line.group(1), pooled, 3)


def test_domain_and_coactivation_tables_equal_a_direct_count(lab):
    """Each domain's 5 largest shares of its tokens (Eq. 7) with the other domain's share beside them, and the 10
    largest co-activations (Eq. 6) off the diagonal, counted here from the router logits."""
    k, N = LAB["k"], LAB["max_tokens"]
    counts = {name: count_by_hand(c, 8)[0] for name, (c, _, _) in lab.direct.items()}
    rows = table(lab.report, "Experts specialised to each domain")
    for name, other in (("prose", "accents"), ("accents", "prose")):
        mine = [r for r in rows if r[0] == name]
        share = counts[name] / N  # (L, E)
        assert sorted(float(r[3]) for r in mine) == pytest.approx(sorted(share.flatten().topk(5).values.tolist()),
                                                                  abs=0.0005)
        for _, l, e, s, x_uniform, rest in mine:
            assert printed(s, share[int(l), int(e)], 3) and printed(x_uniform, share[int(l), int(e)] / (k / 8), 2)
            assert printed(rest, counts[other][int(l), int(e)] / N, 3)
    co = sum(count_by_hand(c, 8)[1] for c, _, _ in lab.direct.values()).double()  # (L, E, E)
    n_i = co.diagonal(dim1=1, dim2=2)
    eq6 = co / n_i[:, :, None].clamp(min=1)
    eq6.diagonal(dim1=1, dim2=2).fill_(0)
    rows = table(lab.report, "Most co-activated experts")
    assert sorted(float(r[3]) for r in rows) == pytest.approx(sorted(eq6.flatten().topk(10).values.tolist()),
                                                              abs=0.0005)
    for l, i, j, v, n in ([int(c) for c in r[:3]] + r[3:] for r in rows):
        assert i != j and printed(v, eq6[l, i, j], 3) and n == str(int(n_i[l, i]))


def vocab_table(report, layer):
    """The token tables of the report: {expert: ([(token text, share, count)] input, [...] output)}."""
    cell = re.compile(r"(`[^`]*`) \((\d+\.\d\d), (\d+)\)")
    return {int(r[0]): tuple([(t, float(s), int(n)) for t, s, n in cell.findall(c)] for c in r[1:])
            for r in table(report, f"Tokens each expert of layer {layer} specialises in")}


def assert_token_column(listed, shares, e, tokenizer):
    """A column lists a top 5 of the eligible ids by their share with expert e: the right shares and counts."""
    assert len(listed) == min(5, len(shares))
    assert sorted(s for _, s, _ in listed) == pytest.approx(sorted(sorted(v[e] for v, _ in shares.values())[-5:]),
                                                            abs=0.0051)
    for text, s, n in listed:
        assert any(rendered(tokenizer, x) == text and n == seen and abs(v[e] - s) <= 0.0051
                   for x, (v, seen) in shares.items()), (e, text, s, n)


def test_layer_flag_picks_the_layer_whose_token_tables_are_counted(lab, tokenizer):
    """--layer 1: the input-token table (Eq. 8) equals a direct count at layer 1, which differs from layer 0's."""
    keys = sum(lab.ids.values(), [])
    at = {l: token_shares(keys, torch.cat([c[l] for c, _, _ in lab.direct.values()])) for l in (0, 1)}
    assert at[0] != at[1] and len(at[1]) >= 3  # the layer matters, and some ids occur 10 times
    assert lab.raw["vocab_layer"] == 1
    tables = vocab_table(lab.report, 1)
    assert sorted(tables) == list(range(8))
    for e, (inputs, _) in tables.items():
        assert_token_column(inputs, at[1], e, tokenizer)


def test_next_token_table_keys_experts_on_the_predicted_next_token(lab, tokenizer):
    """The output column counts, for each token the model predicts next (its argmax, from this position), the
    experts of the position that predicts it; not the experts of the input token."""
    choices = torch.cat([c[LAB["layer"]] for c, _, _ in lab.direct.values()])
    predicted = torch.cat([p for _, _, p in lab.direct.values()]).tolist()
    shares = token_shares(predicted, choices)
    assert len(shares) >= 3 and shares != token_shares(sum(lab.ids.values(), []), choices)
    for e, (_, outputs) in vocab_table(lab.report, LAB["layer"]).items():
        assert_token_column(outputs, shares, e, tokenizer)


def test_saturation_in_report_and_json_equals_a_direct_count(lab):
    """Eq. 5 against a second checkpoint: the share of each token's top 3 both checkpoints pick, by set
    intersection here."""
    shared = [0, 0]
    for name, (choices, _, _) in lab.direct.items():
        for l in range(2):
            shared[l] += sum(len(set(a) & set(b)) for a, b in zip(choices[l].tolist(), lab.compared[name][l].tolist()))
    saturation = [s / (2 * LAB["max_tokens"] * LAB["k"]) for s in shared]
    assert 0 < min(saturation) and max(saturation) < 1  # not a trivial comparison
    assert lab.raw["compare_checkpoints"] == [str(lab.other)]
    assert lab.raw["saturation"] == [pytest.approx(saturation, rel=1e-6)]
    (row,) = table(lab.report, "Router saturation")
    assert row[0] == str(lab.other) and all(printed(c, s, 3) for c, s in zip(row[1:], saturation))


def test_label_names_the_checkpoint_in_report_json_and_figures(lab):
    assert lab.report.startswith(f"# Routing report: {LAB['label']}\n")
    assert lab.raw["checkpoint"] == LAB["label"] and str(lab.checkpoint) not in lab.report
    importorskip("matplotlib")
    assert set(lab.figs) == {"load.png", "domains.png", "coactivation.png", "tokens.png", "specialization.png",
                             "saturation.png"}
    for name, fig in lab.figs.items():
        titles = " ".join([fig.get_suptitle()] + [ax.get_title() for ax in fig.axes])
        assert LAB["label"] in titles and str(lab.checkpoint) not in titles, name
        assert (lab.out / name).stat().st_size > 1000


def test_figures_draw_the_counted_data(lab):
    """What the pictures show, read from their artists: the load and co-activation (of --layer) heat maps, the
    first tokens' top-1 experts, and the saturation curves."""
    importorskip("matplotlib")
    counts, co = (sum(t) for t in zip(*(count_by_hand(c, 8) for c, _, _ in lab.direct.values())))
    load = torch.tensor(lab.figs["load.png"].axes[0].images[0].get_array())  # share of pairs / (1/E)
    assert load.allclose(counts / (2 * LAB["max_tokens"] * LAB["k"]) * 8)
    ax = lab.figs["coactivation.png"].axes[0]
    eq6 = (co[1] / co[1].diagonal()[:, None].clamp(min=1)).fill_diagonal_(float("nan"))
    assert "layer 1" in ax.get_title()
    assert torch.tensor(ax.images[0].get_array().filled(float("nan"))).allclose(eq6.float(), equal_nan=True)
    ax = lab.figs["tokens.png"].axes[0]
    top1 = ax.images[0].get_array()  # (S, L): the first S tokens of the first domain, S at most 32
    S = top1.shape[0]
    assert 0 < S <= 32 and top1.tolist() == lab.direct["prose"][0][:, :S, 0].T.tolist()
    curves = [line for line in lab.figs["saturation.png"].axes[0].get_lines() if line.get_label().startswith("layer")]
    assert [list(c.get_ydata()) for c in curves] == [[s] for s in lab.raw["saturation"][0]]


def test_dtype_flag_runs_the_model_in_that_dtype(tmp_path, routing_checkpoint, tokenizer):
    """--dtype bfloat16: counts and balance losses equal those of the model run in bfloat16 here, whose router
    probabilities differ from float32's enough to tell the two apart."""
    with kept_figures(draw=False):
        routing.main(["--checkpoint", str(routing_checkpoint), *write_texts(tmp_path), "--top-k", "2",
                      "--max-tokens", "40", "--dtype", "bfloat16", "--device", "cpu", "--out", str(tmp_path / "o")])
    raw = json.loads((tmp_path / "o" / "routing.json").read_text())
    losses, counts = {}, {}
    for dtype in (torch.bfloat16, torch.float32):
        routed, prob_sums = torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.float64)
        for name, text in TEXTS.items():
            ids = tokenizer.encode(text, add_special_tokens=False).ids[:40]
            choices, probs, _ = direct_routing(routing_checkpoint, ids, 2, 128, dtype)  # one chunk: k = K = 2
            counts[dtype, name] = count_by_hand(choices, 8)[0]
            routed += counts[dtype, name]
            prob_sums += probs.sum(1).double()
        losses[dtype] = per_layer_balance_loss(routed, prob_sums, 80, K=2)
    assert all(raw["expert_counts"][name] == counts[torch.bfloat16, name].tolist() for name in TEXTS)
    assert raw["balance_loss_per_layer"] == pytest.approx(losses[torch.bfloat16], rel=1e-5)
    assert raw["balance_loss_per_layer"] != pytest.approx(losses[torch.float32], rel=1e-4)


def test_chunks_are_capped_at_the_model_context(tmp_path, routing_checkpoint, tokenizer):
    """--chunk-len 1000 on a model of context 128 routes chunks of 128; without --max-tokens every token counts."""
    text = {"long": TEXTS["prose"] * 2}
    with kept_figures(draw=False):
        routing.main(["--checkpoint", str(routing_checkpoint), *write_texts(tmp_path, text), "--top-k", "2",
                      "--chunk-len", "1000", "--device", "cpu", "--out", str(tmp_path / "o")])
    raw = json.loads((tmp_path / "o" / "routing.json").read_text())
    ids = tokenizer.encode(text["long"], add_special_tokens=False).ids
    assert raw["tokens"] == {"long": len(ids)} and len(ids) > 128
    by_chunk = {chunk: count_by_hand(direct_routing(routing_checkpoint, ids, 2, chunk)[0], 8)[0].tolist()
                for chunk in (128, len(ids))}
    assert by_chunk[128] != by_chunk[len(ids)]  # the chunking shows in the counts
    assert raw["expert_counts"]["long"] == by_chunk[128]


def test_saturation_over_several_checkpoints_and_a_baseline(tmp_path, routing_checkpoint, tokenizer_json, tokenizer):
    """Several --compare-checkpoint give one saturation column each (Eq. 5, checked against a direct count), and
    --baseline runs every analysis on the other model too: its counts are those of routing that model alone, and
    the 'what training did' table reads both models' per-layer figures, computed here."""
    _, other = gen_checkpoint(tmp_path / "other", tokenizer_json, seed=1)
    texts = write_texts(tmp_path)
    common = [*texts, "--top-k", "2", "--max-tokens", "40", "--device", "cpu"]
    with kept_figures():
        routing.main(["--checkpoint", str(routing_checkpoint), *common, "--compare-checkpoint", str(other),
                      "--compare-checkpoint", str(routing_checkpoint), "--baseline", str(other),
                      "--out", str(tmp_path / "a")])
    with kept_figures(draw=False):
        routing.main(["--checkpoint", str(other), *common, "--out", str(tmp_path / "b")])
    raw, alone = (json.loads((tmp_path / d / "routing.json").read_text()) for d in ("a", "b"))
    assert raw["checkpoint"] == str(routing_checkpoint)  # no --label: the checkpoint names itself
    assert raw["compare_checkpoints"] == [str(other), str(routing_checkpoint)]
    assert raw["baseline"]["expert_counts"] == alone["expert_counts"]

    shared, total = torch.zeros(2), 0
    figures = {}  # per model, per layer: largest share, entropy of the shares, balance loss, largest domain gap
    for p in (routing_checkpoint, other):
        counts, spec, prob_sums = 0, [], 0
        for text in TEXTS.values():
            ids = tokenizer.encode(text, add_special_tokens=False).ids[:40]
            choices, probs, _ = direct_routing(p, ids, 2, 128)  # (L, N, 2): k = K = 2
            n = count_by_hand(choices, 8)[0]
            counts, spec, prob_sums = counts + n, spec + [n / len(ids)], prob_sums + probs.sum(1)
            if p == routing_checkpoint:
                b = direct_routing(other, ids, 2, 128)[0]
                shared += torch.tensor([[len(set(x) & set(y)) for x, y in zip(al.tolist(), bl.tolist())]
                                        for al, bl in zip(choices, b)]).sum(-1)
                total += len(ids)
        load = counts / counts.sum(-1, keepdim=True)
        entropy = [-sum(s * math.log2(s) for s in row if s > 0) for row in load.tolist()]
        gap = (torch.maximum(*spec) - torch.minimum(*spec)).max(-1).values
        figures[p] = list(zip(load.max(-1).values.tolist(), entropy,
                              per_layer_balance_loss(counts, prob_sums, 80, K=2), gap.tolist()))
    assert raw["saturation"][0] == pytest.approx((shared / (2 * total)).tolist()) and raw["saturation"][1] == [1, 1]
    report = (tmp_path / "a" / "report.md").read_text()
    assert f"## What training did: {other} → this checkpoint" in report
    rows = table(report, "What training did")
    assert len(rows) == 2
    for l, row in enumerate(rows):
        assert row[0] == str(l)
        for cell, before, after in zip(row[1:5], figures[other][l], figures[routing_checkpoint][l]):
            b, a = cell.split(" → ")
            assert printed(b, before, 3) and printed(a, after, 3), (l, cell, before, after)
    assert [r[0] for r in table(report, "Router saturation")] == [str(other), str(routing_checkpoint)]
    if _has_matplotlib():
        assert all((tmp_path / "a" / f).stat().st_size > 1000 for f in ["specialization.png", "saturation.png"])


def test_saturation_over_training_is_drawn_against_the_tokens_each_checkpoint_trained(short_run, tmp_path):
    """train.py's checkpoints record the tokens they were trained on (trainer_state.json); the saturation curve
    puts each compared checkpoint at its count: steps 0 and 15 of batches of 4 x 32 tokens."""
    importorskip("matplotlib")
    with kept_figures(save=False) as figs:
        routing.main(["--checkpoint", str(short_run / "step-000030"), "--text",
                      f"prose={short_run / 'heldout' / 'prose.txt'}", "--compare-checkpoint",
                      str(short_run / "step-000000"), "--compare-checkpoint", str(short_run / "step-000015"),
                      "--top-k", "2", "--max-tokens", "64", "--device", "cpu", "--out", str(tmp_path / "o")])
        raw = json.loads((tmp_path / "o" / "routing.json").read_text())
        ax = figs["saturation.png"].axes[0]
        curves = [line for line in ax.get_lines() if line.get_label().startswith("layer")]
        assert [list(c.get_xdata()) for c in curves] == [[0, 15 * 4 * 32]] * 2
        assert [list(c.get_ydata()) for c in curves] == [list(col) for col in zip(*raw["saturation"])]
        assert ax.get_xlabel() == "tokens trained by the compared checkpoint"


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tokenizer_json, routing_checkpoint):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_text("")
    (d / "ok.txt").write_text("the lazy dog")
    dense = gen_checkpoint(d / "olmo2", tokenizer_json, "olmo2")[1]
    one_layer = gen_checkpoint(d / "one-layer", tokenizer_json, num_hidden_layers=1)[1]
    return d, {"DENSE": dense, "ONE_LAYER": one_layer}


@pytest.mark.parametrize("case, args, message", [
    ("no equals sign", ["--text", "ok.txt"], "expected NAME=FILE"),
    ("missing file", ["--text", "x=nowhere.txt"], "no such file"),
    ("empty file", ["--text", "x=empty.txt"], "empty.txt: empty"),
    ("a domain named twice", ["--text", "x=ok.txt", "--text", "x=ok.txt"], "the name 'x' is given twice"),
    ("top-k above E", ["--text", "x=ok.txt", "--top-k", "9"], "--top-k 9: expected 1 to 8"),
    ("top-k zero", ["--text", "x=ok.txt", "--top-k", "0"], "--top-k 0: expected 1 to 8"),
    ("max-tokens zero", ["--text", "x=ok.txt", "--max-tokens", "0"], "--max-tokens 0: expected at least 1"),
    ("chunk-len zero", ["--text", "x=ok.txt", "--chunk-len", "0"], "--chunk-len 0: expected at least 1"),
    ("unknown dtype", ["--text", "x=ok.txt", "--dtype", "float8"], "--dtype 'float8': expected one of"),
    ("dense checkpoint", ["--text", "x=ok.txt", "--checkpoint", "DENSE"], "has no router"),
    ("layer out of range", ["--text", "x=ok.txt", "--layer", "2"], "--layer 2: expected 0 to 1"),
    ("compared checkpoint of another shape", ["--text", "x=ok.txt", "--compare-checkpoint", "ONE_LAYER"],
     "has 1 layers of 8 experts, expected 2 of 8"),
    ("baseline of another shape", ["--text", "x=ok.txt", "--baseline", "ONE_LAYER"], "--baseline"),
])
def test_routing_cli_bad_input_is_one_line_error(tmp_path, bad_inputs, routing_checkpoint, case, args, message, capsys):
    d, checkpoints = bad_inputs
    args = [a.replace("ok.txt", str(d / "ok.txt")).replace("empty.txt", str(d / "empty.txt"))
            .replace("nowhere.txt", str(d / "nowhere.txt")) for a in args]
    args = [str(checkpoints.get(a, a)) for a in args]
    if "--checkpoint" not in args:
        args += ["--checkpoint", str(routing_checkpoint)]
    with pytest.raises(SystemExit) as exit:
        routing.main([*args, "--out", str(tmp_path / "out")])  # in this process: a subprocess costs seconds
    err = capsys.readouterr().err
    assert exit.value.code == 1
    assert err.startswith("error: ") and err.strip().count("\n") == 0 and message in err, err


def test_tour_notebook_runs_top_to_bottom(short_run, monkeypatch, capsys):
    """train.py -> checkpoint -> notebook, end to end: the routing lab reads the run's held-out text beside its
    untrained model."""
    importorskip("matplotlib")
    trained_run = short_run / "step-000030"
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OLMOE_CHECKPOINT", str(trained_run))
    notebook = json.loads(open("tour.ipynb").read())
    assert notebook["nbformat"] == 4
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] == [] and c["execution_count"] is None for c in cells)  # stored without outputs
    assert "os.environ.get(\"OLMOE_CHECKPOINT\"" in "".join(cells[0]["source"])
    import matplotlib.pyplot as plt

    namespace = {}
    for i, cell in enumerate(cells):
        exec(compile("".join(cell["source"]), f"tour.ipynb code cell {i + 1}", "exec"), namespace)
    plt.close("all")
    assert set(namespace["texts"]) == {"prose", "code"} and namespace["chunk"] == 32  # the run's held-out text
    assert "What training did: " + str(trained_run.parent / "step-000000") in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------
# Single functions called in the test's own body (so that a mutation run associates them), on data small enough
# to count by hand: collect over a stand-in model, token_text, report and raw_json on hand-made Stats, and the
# command line without matplotlib.


class _FixedRouter:
    """A stand-in MoE model (L = 1, E = 4, V = 8, K = 2) whose routing is fixed by the token id: token x's router
    ranks expert x % 4 first and (x + 1) % 4 second, and the model predicts token (x + 1) % 8 next."""

    config = SimpleNamespace(num_hidden_layers=1, num_experts=4, vocab_size=8, num_experts_per_tok=2)
    model = SimpleNamespace(embed_tokens=SimpleNamespace(weight=torch.zeros(1)))

    def __call__(self, x):  # x (1, n)
        t = x[0]
        router = 4.0 * torch.nn.functional.one_hot(t % 4, 4) + 2.0 * torch.nn.functional.one_hot((t + 1) % 4, 4)
        logits = torch.nn.functional.one_hot((t + 1) % 8, 8).float()
        return SimpleNamespace(logits=logits[None], router_logits=(router[None],))


def test_collect_counts_each_token_ids_occurrences_and_its_experts_over_chunks():
    ids = [5, 5, 7, 5, 1, 5, 5, 0, 5, 5, 5, 5, 5, 2]  # token 5 ten times, over chunks of 3
    s = routing.collect(_FixedRouter(), ids, 2, chunk_len=3)
    seen = collections.Counter(ids)
    assert s.n_in.tolist() == [seen[x] for x in range(8)]  # N_x: occurrences, never negative
    nxt = collections.Counter((x + 1) % 8 for x in ids)
    assert s.n_out.tolist() == [nxt[y] for y in range(8)]
    # token x chose experts {x % 4, (x + 1) % 4}
    assert s.vocab_in.tolist() == [[seen[x] if e in (x % 4, (x + 1) % 4) else 0 for e in range(4)] for x in range(8)]
    share = routing.vocab_specialization(s.vocab_in, s.n_in)
    assert share[5].tolist() == [0.0, 1.0, 1.0, 0.0] and share[7].isnan().all()  # seen 10 times, and once


class _Tokenizer:
    """decode of one id -> a fixed text; ids at and past 4 are padded rows."""

    texts = {0: "a|b", 1: "`x`", 2: "it's\n", 3: "|"}

    def decode(self, ids):
        return self.texts[ids[0]]

    def get_vocab_size(self):
        return 4


def test_token_text_is_the_repr_escaped_text_in_backticks_with_pipes_escaped():
    tok = _Tokenizer()
    assert routing.token_text(tok, 0) == "`a\\|b`"  # a table cell's | escaped
    assert routing.token_text(tok, 1) == "`'x'`"  # no backtick inside the code span
    assert routing.token_text(tok, 2) == "`it's\\n`"  # the newline written as \n
    assert routing.token_text(tok, 3) == "`\\|`"
    assert routing.token_text(tok, 6) == "`<id 6>`"  # a padded row of the model's vocabulary


def _hand_stats(choices, E=8, V=4, shared=None):
    """One domain's Stats from its (L, N, k) choices; the model's K = k; no token seen min_count times."""
    L, N, k = choices.shape
    z = torch.zeros(V, E, dtype=torch.long)
    return routing.Stats(N, balance.expert_counts(choices, E), routing.coactivation_counts(choices, E),
                         balance.expert_counts(choices, E), torch.full((L, E), N / E, dtype=torch.float64),
                         z, z[:, 0], z, z[:, 0], shared=shared)


_TRAINED = torch.tensor([[[0, 1, 2], [0, 1, 3], [4, 5, 6]], [[7, 6, 5], [7, 6, 4], [0, 1, 2]]])  # (L=2, N=3, k=3)
_UNTRAINED = torch.tensor([[[3, 4, 5], [6, 7, 0], [1, 2, 3]], [[2, 3, 4], [5, 6, 7], [0, 1, 2]]])


def _hand_report(**kw):
    stats = {"prose": _hand_stats(_TRAINED, shared=torch.tensor([[6, 3]])),
             "code": _hand_stats(_UNTRAINED, shared=torch.tensor([[9, 9]]))}
    baseline = {"prose": _hand_stats(_UNTRAINED), "code": _hand_stats(_TRAINED)}
    return routing.report(stats, _Tokenizer(), label="trained", compare_label=["earlier"], k=3, K=3, layer=1,
                          baseline=baseline, baseline_label="untrained", **kw)


def test_report_states_the_random_coactivation_baseline_k_minus_1_over_e_minus_1():
    text = _hand_report()
    # k = 3 of E = 8: a token's other 2 experts are 2 of the 7 others
    assert f"Random routing gives (k-1)/(E-1) = {2 / 7:.3f}." in text


def test_every_markdown_table_in_the_report_follows_a_blank_line():
    lines = _hand_report().split("\n")
    headers = [i for i in range(1, len(lines)) if lines[i].startswith("|") and lines[i - 1][:1] != "|"]
    assert len(headers) == 6  # load, domains, co-activation, tokens, saturation, what training did
    assert all(lines[i - 1] == "" and lines[i + 1].startswith("|---") for i in headers), \
        [lines[i - 1] for i in headers]


def test_raw_json_records_the_layer_of_the_token_tables():
    stats = {"prose": _hand_stats(_TRAINED)}
    for layer in (0, 1):
        raw = routing.raw_json(stats, label="x", compare_label=None, k=3, K=3, layer=layer, baseline=stats,
                               baseline_label="b")
        assert raw["vocab_layer"] == layer and raw["baseline"]["vocab_layer"] == layer


def test_cli_without_matplotlib_writes_report_and_says_no_figures_were_drawn(tmp_path, routing_checkpoint,
                                                                           monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import matplotlib raises ImportError
    routing.main(["--checkpoint", str(routing_checkpoint), *write_texts(tmp_path), "--top-k", "2", "--max-tokens",
                  "8", "--device", "cpu", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "note: matplotlib is not installed, so no figures were drawn (pip install matplotlib)\n" in err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["report.md", "routing.json"]
