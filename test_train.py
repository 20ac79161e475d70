"""train.py's specification: a short run learns, its checkpoints load anywhere, a resumed run is the run it
resumed (also on 2 processes), 2 processes train as 1, the two load-balancing conventions read 1 and K at balance,
one step's logged losses, clipped gradient and AdamW update are the recipe's recomputed here, and every bad input is
one line. Tiny models (hidden 32, 2 layers, 8 experts, top-2) on text written here; under a minute."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import balance
import checkpoints
import olmoe
import text
import train
from conftest import TRAIN_MOE, TRAIN_OLMO2, gen_checkpoint, importorskip, megablocks_loss, train_args as args

HERE = Path(__file__).parent


def records(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def weights(step_dir):
    return load_file(step_dir / "model.safetensors")


def params(step_dir):
    """A checkpoint's parameters by olmoe's names (experts stacked), the names its optimizer state uses."""
    return {n: p.detach() for n, p in olmoe.load_model(step_dir).named_parameters()}


# --------------------------------------------------------------------------------------------------------------
# A short run


def test_validation_loss_falls_on_a_short_run(short_run):
    log = records(short_run)
    assert [r["step"] for r in log] == [0, 15, 30]
    assert [r["tokens"] for r in log] == [0, 15 * 4 * 32, 30 * 4 * 32]  # --batch-size 4 x --seq-len 32 a step
    for domain in ["prose", "code"]:
        first, last = log[0]["val"][domain], log[-1]["val"][domain]
        assert first > math.log(300) - 0.5  # an untrained model is near uniform over the vocabulary
        assert last < first - 1.0, (domain, first, last)
        assert log[-1]["val_bpb"][domain] < log[0]["val_bpb"][domain]
    assert len(log[-1]["max_share"]) == len(log[-1]["entropy_bits"]) == 2  # one per layer
    assert all(1 / 8 <= s <= 1 / 2 and 0 < h <= 3 for s, h in zip(log[-1]["max_share"], log[-1]["entropy_bits"]))
    # seconds of training steps so far: more at step 30 than at 15, about twice (each step is timed alike)
    assert 0 < log[1]["train_s"] < log[2]["train_s"] < 6 * log[1]["train_s"]
    assert (short_run / "curves.png").stat().st_size > 0


def cosine_lr(step, peak, warmup, steps):
    """OLMoE's schedule, written here: linear warmup to the peak, then cosine from the peak to a tenth of it."""
    if step <= warmup:
        return peak * step / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup))))


def test_the_optimizer_is_the_recipes_adamw_at_the_scheduled_learning_rate(short_run):
    """AdamW with betas (0.9, 0.95), eps 1e-8 and weight decay 0.1 on every parameter (one group: norms and
    embeddings decay too), and the learning rate of the step it last took, as saved and as logged."""
    names = set(params(short_run / "step-000000"))
    for step in (15, 30):
        optimizer = torch.load(short_run / f"step-{step:06d}" / "train_state.pt", weights_only=True)["optimizer"]
        [group] = optimizer["param_groups"]
        assert set(group["params"]) == names
        assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.9, 0.95), 1e-8, 0.1)
        assert group["lr"] == pytest.approx(cosine_lr(step, 1e-2, 2, 30), rel=1e-9)  # --lr 1e-2 --warmup-steps 2
        assert {float(s["step"]) for s in optimizer["state"].values()} == {step}
    assert [r["lr"] for r in records(short_run)] == pytest.approx([cosine_lr(s, 1e-2, 2, 30) for s in (1, 15, 30)])


def test_held_out_text_is_written_for_the_router_lab(train_data, short_run):
    """The last tenth of each domain, never trained on, cut at a line (the files of a glob taken in order)."""
    code = "".join(p.read_text() for p in sorted((train_data / "code").glob("*.py")))
    prose = (train_data / "prose.txt").read_text()
    for whole, held in [(code, (short_run / "heldout" / "code.txt").read_text()),
                        (prose, (short_run / "heldout" / "prose.txt").read_text())]:
        assert whole.endswith(held) and whole[:-len(held)].endswith("\n")  # cut at a line
        assert 0.09 < len(held) / len(whole) < 0.11  # --val-fraction 0.1


def test_checkpoints_are_whole_hub_layout_folders(short_run):
    steps = sorted(p.name for p in short_run.iterdir() if "step" in p.name)
    assert steps == ["step-000000", "step-000015", "step-000030"]  # the untrained model, then every 15 steps
    step = short_run / "step-000030"
    assert {p.name for p in step.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                                "generation_config.json", "train_state.pt", "trainer_state.json"}
    state = json.loads((step / "trainer_state.json").read_text())
    assert {k: state[k] for k in ("step", "tokens", "seq_len")} == {"step": 30, "tokens": 30 * 4 * 32, "seq_len": 32}
    assert state["args"]["steps"] == 30 and state["args"]["vocab_size"] == 300  # the run's flags, for --resume
    # --keep-resumable 2: the optimizer's state (train_state.pt) in the last two checkpoints only
    assert sorted(p.parent.name for p in short_run.glob("step-*/train_state.pt")) == ["step-000015", "step-000030"]
    assert olmoe.load_model(short_run / "step-000000") is not None  # the weights alone still load
    config = json.loads((step / "config.json").read_text())
    assert config["architectures"] == ["OlmoeForCausalLM"] and config["dtype"] == "float32"
    assert config["vocab_size"] == 320  # 300 padded to a multiple of 64
    tokenizer, eos, _ = checkpoints.load_tokenizer(step)
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


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(train_data, tmp_path, monkeypatch, capsys):
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    flags = ["--steps", "12", "--save-every", "6", "--eval-every", "0"]
    train.main(args(train_data, reference, *flags))
    assert not (reference / "log.jsonl").exists()  # --eval-every 0: never evaluated

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
        train.main(args(train_data, stopped, *flags, "--save-every", "100"))
    assert e.value.code == 130 and "interrupted: saving step 7" in capsys.readouterr().err
    assert sorted(p.name for p in stopped.glob("step-*")) == ["step-000000", "step-000007"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    monkeypatch.setattr(train, "get_batch", get_batch)

    train.main(args(train_data, stopped, *flags, "--resume", str(stopped)))
    ref, got = weights(reference / "step-000012"), weights(stopped / "step-000012")
    assert ref.keys() == got.keys()
    for name in ref:
        assert (ref[name] - got[name]).abs().max() <= 1e-6, name


def test_a_run_killed_after_its_last_checkpoint_logs_each_step_once_when_resumed(train_data, tmp_path):
    """Killed after evaluating steps 3 and 4 but before saving step 4 (here: step-000004 removed), the run resumes
    from step 2 and logs steps 3 and 4 again: log.jsonl holds each step once, the resumed run's."""
    out = tmp_path / "run"
    train.main(args(train_data, out, "--steps", "4", "--eval-every", "1", "--save-every", "2", "--keep-resumable", "2"))
    shutil.rmtree(out / "step-000004")
    train.main(["--resume", str(out)])
    assert [r["step"] for r in records(out)] == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------------------------------------------
# Two processes (gloo) against one, with the same global batch of 8 in micro-batches of 2 (each process accumulates
# 2, the single one 4): per-step losses and gradient norms within a relative 1e-5 (float32; the gradients are
# summed in another order), weights after 4 steps within 1e-5.
# The gradient norm is what catches a reduction that sums instead of averaging (pytorch#162338): AdamW and
# gradient clipping are nearly blind to a factor of 2 in the gradients, so the losses alone would not.


TWO_PROCESS_FLAGS = ("--steps", "4", "--eval-every", "1", "--save-every", "2", "--batch-size", "8",
                     "--micro-batch-size", "2", "--keep-resumable", "2")


@pytest.fixture(scope="module")
def one_process(train_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    train.main(args(train_data, out, *TWO_PROCESS_FLAGS))
    return out


def torchrun_2(argv):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "train.py"), *argv]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"},
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def assert_same_steps(one, two, steps):
    """The logged losses and gradient norms of these steps, and the weights after step 4, within float32's
    reordering of sums."""
    log_one, log_two = records(one), records(two)
    assert [r["step"] for r in log_two] == steps
    for a, b in zip([r for r in log_one if r["step"] in steps], log_two):
        assert b["val"] == pytest.approx(a["val"], rel=1e-5), a["step"]
        for key in ["train_loss", "lb_loss", "z_loss", "grad_norm"] if a["step"] else []:  # step 0 trained nothing
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    ref, got = weights(one / "step-000004"), weights(two / "step-000004")
    for name in ref:
        assert (ref[name] - got[name]).abs().max() <= 1e-5, name


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gloo_processes_train_as_one(train_data, one_process, tmp_path, mode):
    out = tmp_path / mode
    torchrun_2([*args(train_data, out, *TWO_PROCESS_FLAGS), *(["--fsdp"] if mode == "fsdp" else [])])
    assert_same_steps(one_process, out, [0, 1, 2, 3, 4])


def test_a_run_saved_by_one_process_resumes_sharded_over_two(train_data, one_process, tmp_path):
    """--resume of the 1-process run's step 2 by 2 FSDP processes (the full optimizer state sharded on loading):
    steps 3 and 4 are the uninterrupted run's."""
    out = tmp_path / "resumed"
    torchrun_2([*args(train_data, out, *TWO_PROCESS_FLAGS, "--resume", str(one_process / "step-000002")), "--fsdp"])
    assert_same_steps(one_process, out, [3, 4])


# Global-batch balancing: one step of a batch of 8 in one micro-batch, in 4 micro-batches of 2, or over 2 gloo
# processes (DDP, and FSDP2) of 2 micro-batches each. Compared on step 1, from the same untrained weights: its logged
# losses and the gradient it applied (AdamW's first exp_avg, 0.1 g), within float32's reordering. Later steps are no
# test of the split: AdamW's first update is about lr * sign(g), and float32 noise flips the sign of gradients near 0
# whatever the convention. The paper's convention, per micro-batch, fails it: step 1's lb_loss 1.0084 against 1.0068.

GLOBAL = ("--lb-convention", "global", "--lb-coef", "0.5", "--steps", "1", "--save-every", "1", "--eval-every", "1",
          "--batch-size", "8", "--keep-resumable", "2")  # a strong coefficient, so that a wrong count shows


def step_one(out):
    state = torch.load(out / "step-000001" / "train_state.pt", weights_only=True)["optimizer"]["state"]
    return records(out)[1], {name: s["exp_avg"] for name, s in state.items()}


@pytest.mark.parametrize("split", ["micro-batches", "ddp", "fsdp"])
def test_global_batch_balancing_is_one_loss_however_the_step_is_split(train_data, tmp_path, split):
    whole, out = tmp_path / "whole", tmp_path / split
    train.main(args(train_data, whole, *GLOBAL, "--micro-batch-size", "8"))
    flags = args(train_data, out, *GLOBAL, "--micro-batch-size", "2", *(["--fsdp"] if split == "fsdp" else []))
    (train.main if split == "micro-batches" else torchrun_2)(flags)
    (log_a, grad_a), (log_b, grad_b) = step_one(whole), step_one(out)
    for key in ["train_loss", "lb_loss", "z_loss", "grad_norm"]:
        assert log_b[key] == pytest.approx(log_a[key], rel=1e-5), key
    assert grad_a.keys() == grad_b.keys()
    for name in grad_a:
        torch.testing.assert_close(grad_b[name], grad_a[name], rtol=1e-4, atol=1e-9, msg=name)


# --------------------------------------------------------------------------------------------------------------
# One optimizer step, recomputed here from the untrained checkpoint step-000000 with the formulas of this file: the
# loss train.py minimises, its logged terms, the clipped gradient and AdamW's update. AdamW's first step leaves
# exp_avg = (1 - 0.9) g and exp_avg_sq = (1 - 0.95) g^2 of the gradient g it applied, so the saved optimizer state
# shows that gradient after clipping. The untrained gradient's norm is about 1.2: "paper" clips it to 0.1.

ONE_STEP = {
    "paper": dict(lb_convention="paper", lb_coef=0.5, z_coef=0.1, grad_clip=0.1, weight_decay=0.5, seed=0,
                  micro_batch_size=4, dtype="float32"),
    "transformers": dict(lb_convention="transformers", lb_coef=0.2, z_coef=0.3, grad_clip=10.0, weight_decay=2.0,
                         seed=1, micro_batch_size=2, dtype="float32"),  # 2 micro-batches accumulated
}
ONE_STEP["bfloat16"] = dict(ONE_STEP["paper"], dtype="bfloat16")
STEP_1_LR = 1e-2 * 1 / 2  # --lr 1e-2, the first of --warmup-steps 2


@pytest.fixture(scope="module")
def one_step(train_data, tmp_path_factory):
    """name -> the directory of a one-step run with ONE_STEP[name]'s flags, evaluated and saved at steps 0 and 1
    (made once, when a test first asks for it)."""
    runs = {}

    def run(name):
        if name not in runs:
            out = tmp_path_factory.mktemp(name)
            flags = [x for k, v in ONE_STEP[name].items() for x in (f"--{k.replace('_', '-')}", str(v))]
            train.main(args(train_data, out, "--steps", "1", "--eval-every", "1", "--save-every", "1", *flags))
            runs[name] = out
        return runs[name]
    return run


def step_one_recomputed(run, flags):
    """Step 1 from the run's step-000000 on step 1's windows of the run's seed, in float32 and the naive dispatch:
    (cross-entropy, load balancing in the flags' convention, z-loss), each the mean over the micro-batches, and the
    gradient of their mean of ce + lb_coef * lb + z_coef * z, by parameter name."""
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

    model = olmoe.load_model(run / "step-000000", dtype=torch.float32, moe_dispatch="naive")
    index = json.loads((run / "tokens.json").read_text())
    tokens = np.memmap(run / "tokens.bin", dtype=index["dtype"], mode="r")
    x, y = train.get_batch(tokens, index["train"][1], 32, 4, flags["seed"], 1)  # (4, 32) each
    micro = flags["micro_batch_size"]
    n = 4 // micro
    terms = torch.zeros(3)
    for i in range(n):
        out = model(x[i * micro:(i + 1) * micro])
        ce = F.cross_entropy(out.logits.flatten(0, 1), y[i * micro:(i + 1) * micro].flatten())
        rows = [r.flatten(0, 1) for r in out.router_logits]  # L x (N, E)
        if flags["lb_convention"] == "paper":
            lb = megablocks_loss(out.router_logits, 2)
        else:
            lb = load_balancing_loss_func(tuple(rows), 8, 2)
        z = torch.cat(rows).logsumexp(dim=-1).square().mean()
        ((ce + flags["lb_coef"] * lb + flags["z_coef"] * z) / n).backward()
        terms += torch.stack([ce, lb, z]).detach() / n
    return terms.tolist(), {name: p.grad for name, p in model.named_parameters()}


def global_norm(tensors):
    return torch.stack([t.double().square().sum() for t in tensors]).sum().sqrt().item()


@pytest.mark.parametrize("name", ["paper", "transformers"])
def test_logged_losses_and_gradient_norm_are_step_ones_recomputed(one_step, name):
    """The logged lb_loss is the convention's (paper: megablocks' per-layer mean; transformers: its pooled
    load_balancing_loss_func), z_loss the mean squared logsumexp, and grad_norm the norm before clipping of the
    gradient of ce + lb_coef * lb + z_coef * z over the micro-batches."""
    run, flags = one_step(name), ONE_STEP[name]
    (ce, lb, z), grads = step_one_recomputed(run, flags)
    log = records(run)[1]
    assert (log["step"], log["tokens"], log["lr"]) == (1, 4 * 32, pytest.approx(STEP_1_LR))
    assert log["train_loss"] == pytest.approx(ce, rel=1e-5)
    assert log["lb_loss"] == pytest.approx(lb, rel=1e-5)
    assert log["z_loss"] == pytest.approx(z, rel=1e-5)
    assert log["grad_norm"] == pytest.approx(global_norm(grads.values()), rel=1e-4)


@pytest.mark.parametrize("name", ["paper", "transformers"])
def test_checkpoint_config_holds_the_router_coefficients_in_transformers_convention(one_step, name):
    """transformers multiplies its pooled loss, K at balance, by router_aux_loss_coef: the paper's coefficient is
    lb_coef / K there."""
    flags = ONE_STEP[name]
    config = json.loads((one_step(name) / "step-000001" / "config.json").read_text())
    aux = flags["lb_coef"] / 2 if name == "paper" else flags["lb_coef"]
    assert (config["router_aux_loss_coef"], config["router_z_loss_coef"]) == pytest.approx((aux, flags["z_coef"]))


@pytest.mark.parametrize("name", ["paper", "transformers"])
def test_the_applied_gradient_is_clipped_to_grad_clip(one_step, name):
    """Adam's moments after step 1 hold the gradient scaled by grad_clip / norm where the norm exceeds grad_clip
    (paper: 0.1 of about 1.2), and the whole gradient where it does not (transformers: 10)."""
    run, flags = one_step(name), ONE_STEP[name]
    _, grads = step_one_recomputed(run, flags)
    norm = global_norm(grads.values())
    scale = min(1.0, flags["grad_clip"] / (norm + 1e-6))
    assert (scale < 0.1) == (name == "paper")
    state = torch.load(run / "step-000001" / "train_state.pt", weights_only=True)["optimizer"]["state"]
    assert state.keys() == grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(state[n]["exp_avg"], 0.1 * scale * g, rtol=1e-3, atol=1e-9, msg=n)
        torch.testing.assert_close(state[n]["exp_avg_sq"], 0.05 * (scale * g) ** 2, rtol=2e-3, atol=1e-12, msg=n)
    applied = global_norm([s["exp_avg"] / 0.1 for s in state.values()])
    assert applied == pytest.approx(min(norm, flags["grad_clip"]), rel=1e-4)


@pytest.mark.parametrize("name", ["paper", "transformers", "bfloat16"])
def test_weights_take_one_adamw_step_with_decay_on_every_parameter(one_step, name):
    """w1 = w0 (1 - lr wd) - lr m^ / (sqrt(v^) + eps), with the bias-corrected moments m^ = m / (1 - 0.9) and
    v^ = v / (1 - 0.95) of the saved state, in float32 (also under bf16 autocast: the master weights are float32),
    on every parameter: norms (1 at init) and embeddings decay too."""
    run, wd = one_step(name), ONE_STEP[name]["weight_decay"]
    w0, w1 = params(run / "step-000000"), params(run / "step-000001")
    state = torch.load(run / "step-000001" / "train_state.pt", weights_only=True)["optimizer"]["state"]
    assert w1.keys() == state.keys()
    for n, w in w1.items():
        m, v = state[n]["exp_avg"] / 0.1, state[n]["exp_avg_sq"] / 0.05
        assert m.dtype == v.dtype == torch.float32, n
        expected = w0[n] * (1 - STEP_1_LR * wd) - STEP_1_LR * m / (v.sqrt() + 1e-8)
        torch.testing.assert_close(w, expected, rtol=0, atol=2e-7, msg=n)


def test_the_seed_sets_the_initialisation_which_is_olmoes(short_run, one_step):
    """Norms 1, every other weight normal(0, 0.02) cut at 3 standard deviations; the same --seed gives the same
    weights in another run, another seed other weights (and other windows: see the recomputed step 1)."""
    seed_0, again, seed_1 = (weights(r / "step-000000") for r in (one_step("paper"), short_run,
                                                                     one_step("transformers")))
    rest = torch.cat([w.flatten() for n, w in seed_0.items() if "norm" not in n])
    assert rest.abs().max() <= 0.06 and rest.mean().abs() < 1e-3 and 0.0190 < rest.std() < 0.0205
    for n, w in seed_0.items():
        assert torch.equal(w, again[n]), n
        if "norm" in n:
            assert (w == 1).all() and (seed_1[n] == 1).all(), n
        else:
            assert not torch.equal(w, seed_1[n]), n


def test_bfloat16_autocast_changes_step_one_slightly_from_float32(one_step):
    """--dtype bfloat16 on the same weights and windows as float32: the forward and backward run in bf16, so step
    1 moves by about bf16's precision (the gradient norm most: the untrained logits are near 0, and the loss
    barely sees their rounding), while weights and optimizer state stay float32 (see also the AdamW step)."""
    f32, bf16 = records(one_step("paper"))[1], records(one_step("bfloat16"))[1]
    for key in ["train_loss", "lb_loss", "z_loss", "grad_norm"]:
        assert bf16[key] == pytest.approx(f32[key], rel=1e-2), key
    assert abs(bf16["grad_norm"] - f32["grad_norm"]) > 1e-4 * f32["grad_norm"]  # float32 repeats it to 1e-6
    assert bf16["z_loss"] != f32["z_loss"] and bf16["val"] != f32["val"]
    step = one_step("bfloat16") / "step-000001"
    assert json.loads((step / "config.json").read_text())["dtype"] == "float32"
    assert {w.dtype for w in weights(step).values()} == {torch.float32}


# --------------------------------------------------------------------------------------------------------------
# The model as training runs it


def test_gradients_flow_through_the_batched_dispatch_in_float32():
    """Training uses the batched dispatch (olmoe.py's, which on a CPU runs F.grouped_mm's fused kernel in float32):
    its gradients equal the naive dispatch's (the specification), every expert weight receives one."""
    config = olmoe.config_from_dict({**TRAIN_MOE, "vocab_size": 64})
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    grads = {}
    for dispatch in ["naive", "batched"]:
        model = olmoe.Transformer(config, dispatch)
        train.init_weights(model, seed=0)
        out = model(ids)
        loss = out.logits.logsumexp(-1).mean() + balance.paper_loss(out.router_logits, 2) + out.z_loss
        loss.backward()
        grads[dispatch] = {n: p.grad for n, p in model.named_parameters()}
    for name, g in grads["naive"].items():
        assert grads["batched"][name] is not None and grads["batched"][name].abs().sum() > 0, name
        torch.testing.assert_close(grads["batched"][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_learning_rate_warms_up_linearly_then_decays_to_a_tenth_along_a_cosine():
    """A quarter and three quarters into the decay, where a cosine (0.87, 0.23) and a straight line (0.78, 0.33)
    part; at the midpoint they agree."""
    lr = {s: train.get_lr(s, 1.0, 10, 110) for s in range(1, 111)}
    assert lr[1] == pytest.approx(0.1) and lr[4] == pytest.approx(0.4) and lr[10] == pytest.approx(1.0)
    for s in (35, 60, 85, 110):  # 1/4, 1/2, 3/4 and all of the 100 decay steps
        assert lr[s] == pytest.approx(cosine_lr(s, 1.0, 10, 110), rel=1e-12), s
    assert lr[35] == pytest.approx(0.1 + 0.45 * (1 + math.sqrt(0.5))) and lr[110] == pytest.approx(0.1)
    assert all(lr[s] >= lr[s + 1] for s in range(10, 110))


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


def test_fine_tuning_an_olmo2_checkpoint_keeps_its_tokenizer_and_shape(train_data, tmp_path):
    """--init: every parameter trains, and the checkpoints carry the initial checkpoint's tokenizer."""
    tokenizer = text.train_tokenizer([(train_data / "prose.txt").read_text()], 280, special_tokens=[text.EOS])
    config = olmoe.config_from_dict({**TRAIN_OLMO2, "vocab_size": 320, "eos_token_id": 0, "pad_token_id": 0})
    torch.manual_seed(0)
    base = olmoe.Transformer(config)
    olmoe.save_model(base, tmp_path / "base")
    tokenizer.save(str(tmp_path / "base" / "tokenizer.json"))
    out = tmp_path / "ft"
    flags = args(train_data, out, "--steps", "3", "--eval-every", "3")
    flags[flags.index("--model"):flags.index("--model") + 2] = ["--init", str(tmp_path / "base")]
    train.main(flags)
    step = out / "step-000003"
    assert (step / "tokenizer.json").read_text() == (tmp_path / "base" / "tokenizer.json").read_text()
    assert olmoe.read_config(step) == olmoe.read_config(tmp_path / "base")
    before, after = weights(tmp_path / "base"), weights(step)
    assert all((before[n] - after[n]).abs().max() > 0 for n in before)  # every parameter moved


def test_fine_tuning_an_olmoe_checkpoint_starts_from_its_weights(train_data, tokenizer_json, tmp_path):
    """--init with a transformers OLMoE checkpoint, on one domain with --val-fraction 0.2: the step-0 evaluation is
    that model's on the held-out fifth (its loss and bits per byte over the first --eval-tokens in windows of
    --seq-len, each layer's largest expert share and routing entropy), computed here by transformers; evaluations
    and checkpoints come every --eval-every / --save-every steps and at the last; the config keeps the checkpoint's
    shape and records this run's router coefficients."""
    ref, base = gen_checkpoint(tmp_path / "base", tokenizer_json, "olmoe", eos_token_id=0)
    out = tmp_path / "ft"
    flags = args(train_data, out, "--steps", "3", "--eval-every", "2", "--save-every", "2", "--val-fraction", "0.2",
                 "--lb-coef", "0.04", "--z-coef", "0.002")
    del flags[2:4]  # prose only
    flags[flags.index("--model"):flags.index("--model") + 2] = ["--init", str(base)]
    train.main(flags)
    log = records(out)
    assert [r["step"] for r in log] == [0, 2, 3]
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000002", "step-000003"]  # no untrained model

    text, held = (train_data / "prose.txt").read_text(), (out / "heldout" / "prose.txt").read_text()
    assert text.endswith(held) and text[:-len(held)].endswith("\n") and 0.19 < len(held) / len(text) < 0.21
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_json)).encode(held, add_special_tokens=False).ids + [0]  # eos 0
    window = torch.tensor(ids[:513])
    x, y = window[:-1].view(16, 32), window[1:].view(16, 32)  # 512 tokens in 16 windows of 32
    with torch.no_grad():
        out_ref = ref(x, output_router_logits=True)
    loss = F.cross_entropy(out_ref.logits.flatten(0, 1), y.flatten()).item()
    assert log[0]["val"]["prose"] == pytest.approx(loss, rel=1e-5)
    assert log[0]["val_bpb"]["prose"] == pytest.approx(loss / math.log(2) * len(ids) / len(held.encode()), rel=1e-5)
    counts = torch.stack([torch.bincount(r.topk(2, dim=-1).indices.flatten(), minlength=8)
                          for r in out_ref.router_logits]).double()  # (L, E)
    share = counts / counts.sum(-1, keepdim=True)
    assert log[0]["max_share"] == pytest.approx(share.max(-1).values.tolist())
    assert log[0]["entropy_bits"] == pytest.approx((-(share * share.log2()).nan_to_num().sum(-1)).tolist())

    step = out / "step-000003"
    assert (step / "tokenizer.json").read_text() == tokenizer_json.read_text()
    before, after = olmoe.read_config(base), olmoe.read_config(step)
    assert (after.router_aux_loss_coef, after.router_z_loss_coef) == pytest.approx((0.04 / 2, 0.002))
    after.router_aux_loss_coef, after.router_z_loss_coef = before.router_aux_loss_coef, before.router_z_loss_coef
    assert after == before
    w0, w3 = weights(base), weights(step)
    assert w0.keys() == w3.keys()
    for n in w0:  # every parameter trained, by at most 3 steps of about lr each
        assert 0 < (w3[n] - w0[n]).abs().max() < 3 * 1e-2 * 1.5, n


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
    ("resume another config", "differs from the run's --model"),
    ("resume another tokenizer", "--vocab-size 290 differs from the run's --vocab-size 300"),
    ("resume a checkpoint of weights alone", "kept its weights only (--keep-resumable); resume from"),
    ("save-every 0", "--save-every 0: expected at least 1"),
    ("batch-size 0", "--batch-size 0: expected at least 1"),
    ("seq-len 0", "--seq-len 0: expected at least 1"),
    ("val-fraction 0", "0 < --val-fraction < 1"),
    ("text too short to split", "too short to hold out"),
])
def test_bad_input_is_one_error_line(case, expected, train_data, short_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    before = {p.name: p.stat().st_mtime_ns for p in short_run.glob("step-*/*")}
    rest = args(train_data, out)[2:]  # all but the first --text
    argv = {
        "missing text": ["--text", f"prose={tmp_path / 'nope.txt'}", *rest],
        "empty text": ["--text", f"prose={(tmp_path / 'empty.txt')}", *rest],
        "text without a name": ["--text", str(train_data / "prose.txt"), *rest],
        "unknown preset": args(train_data, out, "--model", "olmoe-huge"),  # the last --model counts
        "model and init": args(train_data, out, "--init", str(short_run / "step-000030")),
        "seq-len beyond the context": args(train_data, out, "--seq-len", "129"),
        "batch over processes": args(train_data, out, "--batch-size", "5"),
        "micro-batch": args(train_data, out, "--micro-batch-size", "3"),
        "out holds checkpoints": args(train_data, short_run),
        "resume another config": args(train_data, out, "--resume", str(short_run), model="olmo2.json"),
        "resume another tokenizer": args(train_data, out, "--resume", str(short_run), "--vocab-size", "290"),
        "resume a checkpoint of weights alone": ["--resume", str(short_run / "step-000000")],
        "save-every 0": args(train_data, out, "--save-every", "0"),
        "batch-size 0": args(train_data, out, "--batch-size", "0"),
        "seq-len 0": args(train_data, out, "--seq-len", "0"),
        "val-fraction 0": args(train_data, out, "--val-fraction", "0"),
        "text too short to split": ["--text", f"prose={tmp_path / 'short.txt'}", *rest],
    }[case]
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("one line")
    if case == "batch over processes":  # as torchrun would start the first of 2 processes
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", "0")
    line, err = run_expecting_error(argv, capsys)
    assert expected in line and err.strip().splitlines()[-1] == line  # last, on a line of its own
    assert {p.name: p.stat().st_mtime_ns for p in short_run.glob("step-*/*")} == before


def test_nan_loss_stops_at_that_step_and_keeps_the_last_good_checkpoint(train_data, tmp_path, capsys):
    out = tmp_path / "nan"
    # A learning rate of 1e30 throws the weights to ~1e30 at step 1; a few steps on, the activations overflow.
    line, err = run_expecting_error(args(train_data, out, "--lr", "1e30", "--warmup-steps", "0", "--steps", "8",
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
    importorskip("matplotlib")
    train.main(["--compare-runs", str(short_run), str(one_process), "--out", str(tmp_path / "runs.png")])
    assert (tmp_path / "runs.png").stat().st_size > 10_000
    line, _ = run_expecting_error(["--compare-runs", str(tmp_path), "--out", str(tmp_path / "x.png")], capsys)
    assert "no log.jsonl there" in line


# --------------------------------------------------------------------------------------------------------------
# Details a user sees: which flags a resumed run reports, the evaluation line, presets, the context, routing counts


def test_resume_dir_alone_continues_with_the_runs_flags_and_refuses_another_value(train_data, tmp_path, capsys):
    """--resume DIR alone: the run's own flags (from its trainer_state.json), its directory as --out; a flag given
    again with another value (--lb-coef) is refused naming it, and a longer --steps extends the run. The first run
    saved every step, and kept the optimizer's state in its last checkpoint only."""
    out = tmp_path / "run"
    train.main(args(train_data, out, "--steps", "2", "--save-every", "1", "--eval-every", "0"))
    assert sorted(p.parent.name for p in out.glob("step-*/train_state.pt")) == ["step-000002"]
    line, _ = run_expecting_error(["--resume", str(out), "--lb-coef", "0.02"], capsys)
    assert line.startswith(f"error: --lb-coef 0.02 differs from the run's --lb-coef 0.01 ({out / 'step-000002'})")
    assert "only --steps, --save-every, --eval-every, --keep-resumable" in line
    train.main(["--resume", str(out), "--steps", "3"])
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000000", "step-000001", "step-000002", "step-000003"]
    state = json.loads((out / "step-000003" / "trainer_state.json").read_text())
    assert state["tokens"] == 3 * 4 * 32 and state["args"]["steps"] == 3
    assert {k: state["args"][k] for k in ("lb_coef", "vocab_size", "batch_size", "text")} == \
        {"lb_coef": 0.01, "vocab_size": 300, "batch_size": 4, "text": args(train_data, out)[1:4:2]}
    assert olmoe.load_model(out / "step-000003") is not None


def test_the_evaluation_line_lists_each_layers_largest_expert_share_separated_by_spaces(train_data, tmp_path,
                                                                                        capsys):
    out = tmp_path / "run"
    train.main(args(train_data, out, "--steps", "1", "--eval-every", "1", "--save-every", "1"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    log = records(out)
    assert len(lines) == len(log) == 2
    for line, record in zip(lines, log):
        shares = re.search(r" \| largest expert share per layer (0\.\d{3}) (0\.\d{3})$", line)  # 2 layers
        assert shares, line
        assert line.startswith(f"step {record['step']} | {record['step'] * 4 * 32} tokens | ")
        assert [float(s) for s in shares.groups()] == pytest.approx(record["max_share"], abs=5e-4)  # the logged ones


def test_presets_train_by_name_and_olmoe_cpu_by_default(train_data, tmp_path):
    """No --model: the olmoe-cpu preset (64 experts, 8 per token); --model olmo2-cpu: that dense preset."""
    for model, expected in [(None, dict(model_type="olmoe", hidden_size=128, num_experts=64, num_experts_per_tok=8)),
                            ("olmo2-cpu", dict(model_type="olmo2", hidden_size=128, intermediate_size=512))]:
        out = tmp_path / str(model)
        flags = args(train_data, out, "--steps", "1", "--eval-every", "0", "--save-every", "1", "--seq-len", "8",
                     "--batch-size", "1")
        at = flags.index("--model")
        flags[at:at + 2] = ["--model", model] if model else []
        train.main(flags)
        config = json.loads((out / "step-000001" / "config.json").read_text())
        assert {k: config.get(k) for k in expected} == expected, model
        assert config["num_hidden_layers"] == 4 and config["vocab_size"] == 320


def test_a_seq_len_equal_to_the_models_context_trains(train_data, tmp_path):
    """--seq-len may be the whole context (max_position_embeddings), and no more (see the bad inputs)."""
    (tmp_path / "ctx16.json").write_text(json.dumps({**TRAIN_MOE, "max_position_embeddings": 16}))
    out = tmp_path / "run"
    flags = args(train_data, out, "--steps", "1", "--eval-every", "0", "--save-every", "1", "--seq-len", "16")
    flags[flags.index("--model") + 1] = str(tmp_path / "ctx16.json")
    train.main(flags)
    state = json.loads((out / "step-000001" / "trainer_state.json").read_text())
    assert {k: state[k] for k in ("step", "tokens", "seq_len")} == {"step": 1, "tokens": 1 * 4 * 16, "seq_len": 16}
    assert json.loads((out / "step-000001" / "config.json").read_text())["max_position_embeddings"] == 16
