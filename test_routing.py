"""Tests for routing.py and tour.ipynb: the analyses on routings small enough to count by hand, then the command
line and the notebook on a small random checkpoint."""

import inspect
import json
import math
import subprocess
import sys

import pytest
import torch

import olmoe
import routing
from conftest import TINY_MOE, gen_checkpoint

# One layer, 4 tokens, each choosing k = 2 of E = 4 experts (most probable first).
CHOICES = torch.tensor([[[0, 1], [0, 2], [1, 0], [3, 2]]])  # (L=1, N=4, k=2)


def test_expert_counts_and_load_count_token_expert_pairs():
    # expert 0: tokens 0, 1, 2; expert 1: tokens 0, 2; expert 2: tokens 1, 3; expert 3: token 3
    assert routing.expert_counts(CHOICES, 4).tolist() == [[3, 2, 2, 1]]
    # shares of the 4 * 2 = 8 pairs: 3/8, 2/8, 2/8, 1/8
    assert routing.expert_load(routing.expert_counts(CHOICES, 4)).tolist() == [[0.375, 0.25, 0.25, 0.125]]
    two_layers = torch.tensor([CHOICES[0].tolist(), [[3, 2], [3, 1], [2, 3], [1, 2]]])
    # layer 1: expert 1: tokens 1, 3; expert 2: tokens 0, 2, 3; expert 3: tokens 0, 1, 2
    assert routing.expert_counts(two_layers, 4).tolist() == [[3, 2, 2, 1], [0, 2, 3, 3]]


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
    spec = routing.domain_specialization(routing.expert_counts(CHOICES, 4), 4)
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


def test_balance_losses_by_hand_in_both_conventions():
    # E = 2, K = 1, L = 2 layers of N = 2 tokens.
    # layer 0: probs [.75, .25] twice -> both tokens choose expert 0: counts [2, 0], probability sums [1.5, .5]
    # layer 1: probs [.25, .75], [.75, .25] -> one each: counts [1, 1], probability sums [1, 1]
    counts = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    prob_sums = torch.tensor([[1.5, 0.5], [1.0, 1.0]])
    pooled, per_layer = routing.balance_losses(counts, prob_sums, n_tokens=2, K=1)
    # per layer, f = counts / (N K), p = sums / N: layer 0: 2 * (1 * .75 + 0 * .25) = 1.5; layer 1: 2 * (.25 + .25)
    assert per_layer.tolist() == [1.5, 1.0]
    # pooled: f = [3, 1] / 4, p = [2.5, 1.5] / 4 -> 2 * (.75 * .625 + .25 * .375) = 1.125, not the mean 1.25
    assert pooled.item() == 1.125
    # uniform routing, E = 4, K = 2: tokens choose {0,1} and {2,3}, all probabilities 1/4:
    # f = [1, 1, 1, 1] / 2 (sums to K = 2), p = 1/4 -> transformers 4 * 4 * (1/2 * 1/4) = 2 = K; normalised 1
    pooled, per_layer = routing.balance_losses(torch.tensor([[1.0, 1, 1, 1]]), torch.full((1, 4), 0.5), 2, K=2)
    assert pooled.item() == 2.0 and per_layer.tolist() == [1.0]


def test_layer_figures_by_hand():
    # E = 4, one layer; two domains of 2 tokens each, k = 2
    # prose: tokens choose {0, 1}, {0, 1}; code: {0, 2}, {3, 2}
    prose, code = torch.tensor([[[0, 1], [0, 1]]]), torch.tensor([[[0, 2], [3, 2]]])
    stats = {d: routing.Stats(2, routing.expert_counts(c, 4), routing.coactivation_counts(c, 4),
                              routing.expert_counts(c, 4), torch.full((1, 4), 0.5, dtype=torch.float64),
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


def test_transformers_convention_equals_olmoe_load_balancing_loss():
    torch.manual_seed(0)
    L, B, T, E, K = 3, 2, 7, 8, 2
    router_logits = tuple(torch.randn(B, T, E) * 3 for _ in range(L))  # L x (B, T, E)
    expected = olmoe.load_balancing_loss(*olmoe.router_rows(router_logits), K)
    probs = torch.stack([r.flatten(0, 1).softmax(-1, dtype=torch.float32) for r in router_logits])  # (L, N, E)
    counts = routing.expert_counts(routing.top_experts(probs, K), E)
    pooled, per_layer = routing.balance_losses(counts, probs.sum(1), B * T, K)
    print(f"transformers convention {pooled.item():.6f}, olmoe.load_balancing_loss {expected.item():.6f}")
    assert abs(pooled.item() - expected.item()) < 1e-6
    assert per_layer.shape == (L,)


def test_top_experts_rank_by_probability_for_any_k():
    probs = torch.tensor([[[0.1, 0.5, 0.15, 0.25]]])  # (L=1, N=1, E=4)
    assert routing.top_experts(probs, 1).tolist() == [[[1]]]
    assert routing.top_experts(probs, 3).tolist() == [[[1, 3, 2]]]


# --------------------------------------------------------------------------------------------------------------
# The command line and the notebook, on a small random checkpoint

TEXTS = {"prose": "the quick brown fox jumps over the lazy dog. " * 6, "accents": "café naïve 日本語 " * 12}


@pytest.fixture(scope="module")
def routing_checkpoint(tmp_path_factory, tokenizer_json):
    return gen_checkpoint(tmp_path_factory.mktemp("routing-ckpt"), tokenizer_json)[1]


def run_routing(*args):
    return subprocess.run([sys.executable, "routing.py", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def write_texts(tmp_path):
    files = []
    for name, text in TEXTS.items():
        (tmp_path / f"{name}.txt").write_text(text)
        files += ["--text", f"{name}={tmp_path / f'{name}.txt'}"]
    return files


def test_cli_counts_equal_a_direct_count_from_router_logits(tmp_path, routing_checkpoint, tokenizer_json):
    k, chunk = 3, 16  # k differs from the model's K = 2; chunks shorter than the texts
    out = tmp_path / "lab"
    r = run_routing("--checkpoint", routing_checkpoint, *write_texts(tmp_path), "--top-k", k, "--chunk-len", chunk,
                    "--max-tokens", 50, "--device", "cpu", "--compare-checkpoint", routing_checkpoint, "--out", out)
    assert r.returncode == 0, r.stderr
    raw = json.loads((out / "routing.json").read_text())
    assert (raw["layers"], raw["experts"], raw["top_k"]) == (2, 8, k)

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    model = olmoe.load_model(routing_checkpoint, dtype=torch.float32)  # as the CLI on a CPU
    coact = torch.zeros(2, 8, 8, dtype=torch.long)
    for name, text in TEXTS.items():
        ids = tok.encode(text, add_special_tokens=False).ids[:50]
        assert raw["tokens"][name] == len(ids) == 50
        counts = torch.zeros(2, 8, dtype=torch.long)
        for start in range(0, len(ids), chunk):  # the same chunks, each a fresh context
            with torch.no_grad():
                logits = model(torch.tensor([ids[start:start + chunk]])).router_logits  # L x (1, n, E)
            for layer, r_l in enumerate(logits):
                for experts in r_l[0].topk(k).indices.tolist():  # plain loops over tokens: the oracle
                    for i in experts:
                        counts[layer, i] += 1
                        for j in experts:
                            coact[layer, i, j] += 1
        assert raw["expert_counts"][name] == counts.tolist()
    assert raw["coactivation"] == coact.tolist()
    assert raw["saturation"] == [[1.0, 1.0]]  # a checkpoint against itself agrees on every expert
    report = (out / "report.md").read_text()
    for heading in ["Load per layer", "specialised to each domain", "co-activated", "Tokens each expert",
                    "saturation"]:
        assert heading in report
    if _has_matplotlib():
        for name in ["load.png", "domains.png", "coactivation.png", "tokens.png"]:
            assert (out / name).stat().st_size > 1000
    else:
        assert "matplotlib is not installed" in r.stderr


def test_saturation_over_several_checkpoints_and_a_baseline(tmp_path, routing_checkpoint, tokenizer_json):
    """Several --compare-checkpoint give one saturation column each (Eq. 5, checked against a direct count), and
    --baseline runs every analysis on the other model too: its counts are those of routing that model alone."""
    _, other = gen_checkpoint(tmp_path / "other", tokenizer_json, seed=1)
    texts = write_texts(tmp_path)
    common = [*texts, "--top-k", "2", "--max-tokens", "40", "--device", "cpu"]
    routing.main(["--checkpoint", str(routing_checkpoint), *common, "--compare-checkpoint", str(other),
                  "--compare-checkpoint", str(routing_checkpoint), "--baseline", str(other),
                  "--out", str(tmp_path / "a")])
    routing.main(["--checkpoint", str(other), *common, "--out", str(tmp_path / "b")])
    raw, alone = (json.loads((tmp_path / d / "routing.json").read_text()) for d in ("a", "b"))
    assert raw["compare_checkpoints"] == [str(other), str(routing_checkpoint)]
    assert raw["baseline"]["expert_counts"] == alone["expert_counts"]

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    shared, total = torch.zeros(2), 0
    for text in TEXTS.values():
        ids = torch.tensor([tok.encode(text, add_special_tokens=False).ids[:40]])
        with torch.no_grad():
            a, b = (torch.stack([r[0].topk(2).indices for r in olmoe.load_model(p, dtype=torch.float32)(ids)
                                 .router_logits]) for p in (routing_checkpoint, other))  # (L, N, 2) each
        shared += torch.tensor([[len(set(x) & set(y)) for x, y in zip(al.tolist(), bl.tolist())]
                                for al, bl in zip(a, b)]).sum(-1)
        total += ids.shape[1]
    assert raw["saturation"][0] == pytest.approx((shared / (2 * total)).tolist()) and raw["saturation"][1] == [1, 1]
    report = (tmp_path / "a" / "report.md").read_text()
    assert "What training did" in report and "saturation against other checkpoints" in report
    if _has_matplotlib():
        assert all((tmp_path / "a" / f).stat().st_size > 1000 for f in ["specialization.png", "saturation.png"])


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
    return d, dense


@pytest.mark.parametrize("case, args, message", [
    ("no equals sign", ["--text", "ok.txt"], "expected NAME=FILE"),
    ("missing file", ["--text", "x=nowhere.txt"], "no such file"),
    ("empty file", ["--text", "x=empty.txt"], "is empty"),
    ("top-k above E", ["--text", "x=ok.txt", "--top-k", "9"], "--top-k 9: expected 1 to 8"),
    ("dense checkpoint", ["--text", "x=ok.txt", "--checkpoint", "DENSE"], "has no router"),
    ("layer out of range", ["--text", "x=ok.txt", "--layer", "2"], "--layer 2"),
])
def test_routing_cli_bad_input_is_one_line_error(tmp_path, bad_inputs, routing_checkpoint, case, args, message, capsys):
    d, dense = bad_inputs
    args = [a.replace("ok.txt", str(d / "ok.txt")).replace("empty.txt", str(d / "empty.txt"))
            .replace("nowhere.txt", str(d / "nowhere.txt")).replace("DENSE", str(dense)) for a in args]
    if "--checkpoint" not in args:
        args += ["--checkpoint", str(routing_checkpoint)]
    with pytest.raises(SystemExit) as exit:
        routing.main([*args, "--out", str(tmp_path / "out")])  # in this process: a subprocess costs seconds
    err = capsys.readouterr().err
    assert exit.value.code == 1
    assert err.startswith("error: ") and err.strip().count("\n") == 0 and message in err, err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny OLMoE trained by train.py for a few seconds on two small texts: its last checkpoint, whose run
    directory holds the held-out text and the untrained model, as a real run's does."""
    import train

    d = tmp_path_factory.mktemp("run")
    (d / "prose.txt").write_text(TEXTS["prose"] * 40)
    (d / "code.txt").write_text(inspect.getsource(routing))
    (d / "moe.json").write_text(json.dumps({**TINY_MOE, "model_type": "olmoe"}))
    train.main(["--text", f"prose={d / 'prose.txt'}", "--text", f"code={d / 'code.txt'}", "--out", str(d / "run"),
                "--model", str(d / "moe.json"), "--vocab-size", "300", "--batch-size", "4", "--seq-len", "32",
                "--steps", "10", "--eval-every", "0", "--save-every", "10", "--lr", "1e-2", "--warmup-steps", "2"])
    return d / "run" / "step-000010"


def test_tour_notebook_runs_top_to_bottom(trained_run, monkeypatch, capsys):
    """train.py -> checkpoint -> notebook, end to end: the routing lab reads the run's held-out text beside its
    untrained model."""
    pytest.importorskip("matplotlib")
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
