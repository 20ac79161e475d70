"""train.py's specification: a short run learns, its checkpoints load anywhere, a resumed run is the run it
resumed, 2 processes train as 1, the two load-balancing conventions read 1 and K at balance, and every bad
input is one line. Tiny models (hidden 32, 2 layers, 8 experts, top-2) on text written here; about a minute."""

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import olmoe
import train

HERE = Path(__file__).parent
TINY_MOE = dict(model_type="olmoe", hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                num_experts=8, num_experts_per_tok=2, max_position_embeddings=128)
TINY_OLMO2 = dict(model_type="olmo2", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two domains of made-up text with structure a tiny model learns in a few steps, and tiny model configs."""
    d = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    words = "the a cat dog bird sees likes chases runs home tree river over under and then".split()
    (d / "prose.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + "."
                                           for _ in range(1500)))
    code = d / "code"
    code.mkdir()
    for i in range(6):  # a glob of several files: whole files are held out
        (code / f"m{i}.py").write_text("\n".join(f"def f_{rng.randint(0, 99)}(x):\n    return x * "
                                                 f"{rng.randint(0, 9)} + {rng.randint(0, 9)}\n" for _ in range(200)))
    for name, config in [("moe.json", TINY_MOE), ("olmo2.json", TINY_OLMO2)]:
        (d / name).write_text(json.dumps(config))
    return d


def args(data, out, *extra, model="moe.json"):
    """train.py's flags for a tiny run: batch 4 x 32 tokens, a BPE vocabulary of 300."""
    return ["--text", f"prose={data / 'prose.txt'}", "--text", f"code={data / 'code' / '*.py'}", "--out", str(out),
            "--model", str(data / model), "--vocab-size", "300", "--batch-size", "4", "--seq-len", "32",
            "--eval-tokens", "512", "--lr", "1e-2", "--warmup-steps", "2", *extra]


def records(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def weights(step_dir):
    return load_file(step_dir / "model.safetensors")


# --------------------------------------------------------------------------------------------------------------
# A short run


@pytest.fixture(scope="module")
def short_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("short")
    train.main(args(data, out, "--steps", "30", "--eval-every", "15", "--save-every", "15"))
    return out


def test_validation_loss_falls_on_a_short_run(short_run):
    log = records(short_run)
    assert [r["step"] for r in log] == [0, 15, 30]
    for domain in ["prose", "code"]:
        first, last = log[0]["val"][domain], log[-1]["val"][domain]
        assert first > math.log(300) - 0.5  # an untrained model is near uniform over the vocabulary
        assert last < first - 1.0, (domain, first, last)
        assert log[-1]["val_bpb"][domain] < log[0]["val_bpb"][domain]
    assert len(log[-1]["max_share"]) == len(log[-1]["entropy_bits"]) == 2  # one per layer
    assert all(1 / 8 <= s <= 1 / 2 and 0 < h <= 3 for s, h in zip(log[-1]["max_share"], log[-1]["entropy_bits"]))
    assert (short_run / "curves.png").stat().st_size > 0

def test_held_out_text_is_written_for_the_router_lab(data, short_run):
    """The last tenth of each domain, never trained on, cut at a line (the files of a glob taken in order)."""
    code = "".join(p.read_text() for p in sorted((data / "code").glob("*.py")))
    prose = (data / "prose.txt").read_text()
    for text, held in [(code, (short_run / "heldout" / "code.txt").read_text()),
                       (prose, (short_run / "heldout" / "prose.txt").read_text())]:
        assert text.endswith(held) and text[:-len(held)].endswith("\n")  # cut at a line
        assert 0.09 < len(held) / len(text) < 0.11  # --val-fraction 0.1


def test_checkpoints_are_whole_hub_layout_folders(short_run):
    steps = sorted(p.name for p in short_run.iterdir() if "step" in p.name)
    assert steps == ["step-000000", "step-000015", "step-000030"]  # the untrained model, then every 15 steps
    step = short_run / "step-000030"
    assert {p.name for p in step.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                                "generation_config.json", "train_state.pt", "trainer_state.json"}
    assert json.loads((step / "trainer_state.json").read_text()) == {"step": 30, "tokens": 30 * 4 * 32, "seq_len": 32}
    config = json.loads((step / "config.json").read_text())
    assert config["architectures"] == ["OlmoeForCausalLM"] and config["dtype"] == "float32"
    assert config["vocab_size"] == 320  # 300 padded to a multiple of 64
    import generate

    tokenizer, eos, _ = generate.load_tokenizer(step)
    assert eos == {tokenizer.token_to_id("<|endoftext|>")} == {json.loads(
        (step / "generation_config.json").read_text())["eos_token_id"]}


def test_checkpoint_gives_the_same_logits_in_olmoe_and_transformers(short_run):
    from transformers import AutoModelForCausalLM

    step = short_run / "step-000030"
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = olmoe.load_model(step)
    theirs = AutoModelForCausalLM.from_pretrained(step)
    assert type(theirs).__name__ == "OlmoeForCausalLM" and theirs.dtype == torch.float32
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert (a - b).abs().max() < 1e-5
    assert a.std() > 0.5  # trained logits, not a near-constant output


# --------------------------------------------------------------------------------------------------------------
# Resume


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(data, tmp_path, monkeypatch, capsys):
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    flags = ["--steps", "12", "--save-every", "6", "--eval-every", "0"]
    train.main(args(data, reference, *flags))

    # Ctrl-C during step 7, delivered twice as torchrun's workers get it: step 7 finishes, is saved, and the run
    # exits with 130.
    get_batch = train.get_batch

    def interrupt_at_step_7(*a):
        if a[-1] == 7:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return get_batch(*a)

    monkeypatch.setattr(train, "get_batch", interrupt_at_step_7)
    with pytest.raises(SystemExit) as e:
        train.main(args(data, stopped, *flags, "--save-every", "100"))
    assert e.value.code == 130 and "interrupted: saving step 7" in capsys.readouterr().err
    assert sorted(p.name for p in stopped.glob("step-*")) == ["step-000000", "step-000007"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    monkeypatch.setattr(train, "get_batch", get_batch)

    train.main(args(data, stopped, *flags, "--resume", str(stopped)))
    ref, got = weights(reference / "step-000012"), weights(stopped / "step-000012")
    assert ref.keys() == got.keys()
    for name in ref:
        assert (ref[name] - got[name]).abs().max() <= 1e-6, name


# --------------------------------------------------------------------------------------------------------------
# Two processes (gloo) against one, with the same global batch of 8 in micro-batches of 2 (each process accumulates
# 2, the single one 4): per-step losses and gradient norms within a relative 1e-5 (float32; the gradients are
# summed in another order), weights after 4 steps within 1e-5.
# The gradient norm is what catches a reduction that sums instead of averaging (pytorch#162338): AdamW and
# gradient clipping are nearly blind to a factor of 2 in the gradients, so the losses alone would not.


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    train.main(args(data, out, "--steps", "4", "--eval-every", "1", "--save-every", "4", "--batch-size", "8",
                    "--micro-batch-size", "2"))
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gloo_processes_train_as_one(data, one_process, tmp_path, mode):
    out = tmp_path / mode
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "train.py"), *args(data, out, "--steps", "4", "--eval-every", "1", "--save-every", "4",
                                         "--batch-size", "8", "--micro-batch-size", "2"),
           *(["--fsdp"] if mode == "fsdp" else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = records(one_process), records(out)
    assert [r["step"] for r in two] == [0, 1, 2, 3, 4]
    for a, b in zip(one[1:], two[1:]):
        for key in ["train_loss", "lb_loss", "z_loss", "grad_norm"]:
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    ref, got = weights(one_process / "step-000004"), weights(out / "step-000004")
    for name in ref:
        assert (ref[name] - got[name]).abs().max() <= 1e-5, name


# --------------------------------------------------------------------------------------------------------------
# The two load-balancing conventions


def balanced_router_logits(L=2, N=16, E=8, K=2):
    """Router logits whose every expert gets exactly N*K/E of the token-expert pairs and whose mean probability is
    1/E: token t prefers experts t, t+1, ..., t+K-1 (mod E) equally, so the picture is the same from every expert."""
    logits = torch.zeros(N, E)
    for t in range(N):
        logits[t, [(t + j) % E for j in range(K)]] = 3.0
    return [logits.view(1, N, E).clone() for _ in range(L)]  # L x (B=1, T=N, E)


def megablocks_loss(router_logits, K):
    """megablocks' batched_load_balancing_loss (the Muennighoff/megablocks fork OLMoE trained with), written as it
    computes it: tokens_per_expert and the mean expert scores of all layers concatenated, one dot product, scaled
    by E / (L * T * K)."""
    scores = [r.flatten(0, 1).softmax(dim=-1) for r in router_logits]  # L x (tokens, E)
    L, (T, E) = len(scores), scores[0].shape
    tokens_per_expert = torch.cat([torch.bincount(s.topk(K, dim=-1).indices.flatten(), minlength=E)
                                   for s in scores]).float()  # (L*E,)
    expert_scores = torch.cat(scores, dim=1).mean(dim=0)  # (L*E,)
    return E / (L * T * K) * torch.dot(tokens_per_expert, expert_scores)


def test_paper_convention_is_1_and_transformers_is_K_at_perfect_balance():
    K = 2
    logits = balanced_router_logits(K=K)
    assert train.balance_loss_paper(logits, K).item() == pytest.approx(1.0, abs=1e-6)
    transformers_value = olmoe.load_balancing_loss(*olmoe.router_rows(logits), K)  # what Output.aux_loss holds
    assert transformers_value.item() == pytest.approx(K, abs=1e-6)


def test_paper_convention_is_E_over_K_when_every_token_takes_the_same_experts():
    E, K = 8, 2
    logits = torch.full((1, 16, E), -30.0)
    logits[..., :K] = 0.0  # all the probability on experts 0 and 1, equally
    assert train.balance_loss_paper([logits, logits], K).item() == pytest.approx(E / K, rel=1e-5)


def test_paper_convention_equals_megablocks_on_random_routing():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(3, 10, 8, generator=g) * s for s in (0.5, 2.0, 5.0)]
    assert train.balance_loss_paper(logits, 2).item() == pytest.approx(megablocks_loss(logits, 2).item(), rel=1e-6)


# --------------------------------------------------------------------------------------------------------------
# The model as training runs it


def test_gradients_flow_through_the_batched_dispatch_in_float32():
    """Training uses the batched dispatch, on a CPU the fused grouped matmul in float32: its gradients equal the
    naive dispatch's (the specification), every expert weight receives one."""
    config = olmoe.config_from_dict({**TINY_MOE, "vocab_size": 64})
    assert olmoe.moe_path(*olmoe.device_facts(torch.device("cpu")), torch.float32, False, 48, 2, 8) == "grouped"
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    grads = {}
    for dispatch in ["naive", "batched"]:
        model = olmoe.Transformer(config, dispatch)
        train.init_weights(model, seed=0)
        out = model(ids)
        loss = out.logits.logsumexp(-1).mean() + train.balance_loss_paper(out.router_logits, 2) + out.z_loss
        loss.backward()
        grads[dispatch] = {n: p.grad for n, p in model.named_parameters()}
    for name, g in grads["naive"].items():
        assert grads["batched"][name] is not None and grads["batched"][name].abs().sum() > 0, name
        torch.testing.assert_close(grads["batched"][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_learning_rate_warms_up_linearly_then_decays_to_a_tenth():
    lr = [train.get_lr(s, 1.0, 10, 110) for s in range(1, 111)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert lr[59] == pytest.approx(0.55) and lr[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lr[9:], lr[10:]))


def test_cpu_preset_keeps_olmoe_design():
    c = train.PRESETS["olmoe-cpu"]()
    assert (c.model_type, c.num_experts, c.num_experts_per_tok) == ("olmoe", 64, 8)
    assert train.PRESETS["olmo2-cpu"]().model_type == "olmo2"


def test_windows_depend_only_on_seed_and_step():
    import numpy as np

    tokens = np.arange(1000, dtype=np.uint16)
    x, y = train.get_batch(tokens, 900, 16, 4, seed=1, step=5)
    assert x.shape == y.shape == (4, 16) and (y[:, :-1] == x[:, 1:]).all() and (y[:, -1] == x[:, -1] + 1).all()
    assert (train.get_batch(tokens, 900, 16, 4, seed=1, step=5)[0] == x).all()
    assert not (train.get_batch(tokens, 900, 16, 4, seed=1, step=6)[0] == x).all()


def test_fine_tuning_an_olmo2_checkpoint_keeps_its_tokenizer_and_shape(data, tmp_path):
    """--init: every parameter trains, and the checkpoints carry the initial checkpoint's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([(data / "prose.txt").read_text()], trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    config = olmoe.config_from_dict({**TINY_OLMO2, "vocab_size": 320, "eos_token_id": 0, "pad_token_id": 0})
    torch.manual_seed(0)
    base = olmoe.Transformer(config)
    olmoe.save_model(base, tmp_path / "base")
    tokenizer.save(str(tmp_path / "base" / "tokenizer.json"))
    out = tmp_path / "ft"
    flags = args(data, out, "--steps", "3", "--eval-every", "3")
    flags[flags.index("--model"):flags.index("--model") + 2] = ["--init", str(tmp_path / "base")]
    train.main(flags)
    step = out / "step-000003"
    assert (step / "tokenizer.json").read_text() == (tmp_path / "base" / "tokenizer.json").read_text()
    assert olmoe.read_config(step) == olmoe.read_config(tmp_path / "base")
    before, after = weights(tmp_path / "base"), weights(step)
    assert all((before[n] - after[n]).abs().max() > 0 for n in before)  # every parameter moved


# --------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit status 1, no checkpoint lost


def run_expecting_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 1, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0], err


@pytest.mark.parametrize("case, expected", [
    ("missing text", "no such file"),
    ("empty text", "empty"),
    ("text without a name", "expected NAME=FILE_OR_GLOB"),
    ("unknown preset", "unknown preset"),
    ("model and init", "--model and --init"),
    ("seq-len beyond the context", "beyond the model's context of 128"),
    ("batch over processes", "does not divide over 2 processes"),
    ("micro-batch", "does not divide the 4 sequences"),
    ("out holds checkpoints", "already holds checkpoints"),
    ("resume another config", "another model config"),
    ("resume another tokenizer", "another tokenizer"),
    ("save-every 0", "--save-every 0: expected at least 1"),
    ("batch-size 0", "--batch-size 0: expected at least 1"),
    ("seq-len 0", "--seq-len 0: expected at least 1"),
    ("val-fraction 0", "0 < --val-fraction < 1"),
    ("text too short to split", "too short to hold out"),
])
def test_bad_input_is_one_error_line(case, expected, data, short_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    before = {p.name: p.stat().st_mtime_ns for p in short_run.glob("step-*/*")}
    argv = {
        "missing text": args(data, out)[:1] + [f"prose={tmp_path / 'nope.txt'}"] + args(data, out)[2:],
        "empty text": args(data, out)[:1] + [f"prose={(tmp_path / 'empty.txt')}"] + args(data, out)[2:],
        "text without a name": args(data, out)[:1] + [str(data / "prose.txt")] + args(data, out)[2:],
        "unknown preset": args(data, out, "--model", "olmoe-huge"),  # the last --model counts
        "model and init": args(data, out, "--init", str(short_run / "step-000030")),
        "seq-len beyond the context": args(data, out, "--seq-len", "129"),
        "batch over processes": args(data, out, "--batch-size", "5"),
        "micro-batch": args(data, out, "--micro-batch-size", "3"),
        "out holds checkpoints": args(data, short_run),
        "resume another config": args(data, out, "--resume", str(short_run), model="olmo2.json"),
        "resume another tokenizer": args(data, out, "--resume", str(short_run), "--vocab-size", "290"),
        "save-every 0": args(data, out, "--save-every", "0"),
        "batch-size 0": args(data, out, "--batch-size", "0"),
        "seq-len 0": args(data, out, "--seq-len", "0"),
        "val-fraction 0": args(data, out, "--val-fraction", "0"),
        "text too short to split": args(data, out)[:1] + [f"prose={tmp_path / 'short.txt'}"] + args(data, out)[2:],
    }[case]
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("one line")
    if case == "batch over processes":  # as torchrun would start the first of 2 processes
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", "0")
    line, err = run_expecting_error(argv, capsys)
    assert expected in line and err.strip() == line
    assert {p.name: p.stat().st_mtime_ns for p in short_run.glob("step-*/*")} == before


def test_nan_loss_stops_at_that_step_and_keeps_the_last_good_checkpoint(data, tmp_path, capsys):
    out = tmp_path / "nan"
    # A learning rate of 1e30 throws the weights to ~1e30 at step 1; a few steps on, the activations overflow.
    line, err = run_expecting_error(args(data, out, "--lr", "1e30", "--warmup-steps", "0", "--steps", "8",
                                         "--save-every", "1", "--eval-every", "0"), capsys)
    match = re.search(r"the loss became (nan|inf|-inf) at step (\d+);", line)
    assert match and "--lr" in line, line
    step = int(match[2])
    assert 2 <= step < 8 and f"the last good checkpoint is {out / f'step-{step - 1:06d}'}" in line
    assert err.splitlines()[-1] == line
    # every step before it saved, whole; nothing of the failed step, and no temporary folder left
    assert sorted(p.name for p in out.iterdir() if "step" in p.name) == [f"step-{s:06d}" for s in range(step)]
    assert olmoe.load_model(out / f"step-{step - 1:06d}") is not None


def test_compare_runs_draws_several_runs_and_names_a_missing_log(short_run, one_process, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    train.main(["--compare-runs", str(short_run), str(one_process), "--out", str(tmp_path / "runs.png")])
    assert (tmp_path / "runs.png").stat().st_size > 10_000
    line, _ = run_expecting_error(["--compare-runs", str(tmp_path), "--out", str(tmp_path / "x.png")], capsys)
    assert "no log.jsonl there" in line
