"""Tests for olmoe.py, a specification to read: parity with transformers, the mixture of experts and its
dispatches, the training-side forward, and the loader. Run on CPU in about a minute."""

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
import transformers

import benchmark
import olmoe
from conftest import TINY, TINY_MOE, copy_checkpoint, hf_model, save, tokens


def max_logit_error(ref, path, ids, **load_kwargs):
    ours = olmoe.load_model(path, **load_kwargs)
    with torch.no_grad():
        return (ref(ids).logits - ours(ids).logits).abs().max().item()


# --------------------------------------------------------------------------------------------------------------
# Parity with transformers


PARITY_CASES = {
    "olmoe": ("olmoe", {}),
    "olmoe-clip_qkv": ("olmoe", dict(clip_qkv=0.5)),
    "olmoe-norm_topk_prob": ("olmoe", dict(norm_topk_prob=True)),
    "olmoe-gqa": ("olmoe", dict(num_key_value_heads=2)),
    "olmoe-tied": ("olmoe", dict(tie_word_embeddings=True)),
    "olmoe-rope-linear": ("olmoe", dict(rope_parameters=dict(rope_type="linear", factor=4.0, rope_theta=500.0))),
    "olmoe-rope-dynamic": ("olmoe", dict(max_position_embeddings=8,
                                         rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=1e4))),
    "olmo2": ("olmo2", {}),
    "olmo2-gqa-head_dim": ("olmo2", dict(num_key_value_heads=2, head_dim=16)),
    "olmo2-tied": ("olmo2", dict(tie_word_embeddings=True)),
    "olmo2-rope-dynamic": ("olmo2", dict(max_position_embeddings=8,
                                         rope_parameters=dict(rope_type="dynamic", factor=3.0, rope_theta=5e5))),
}


@pytest.mark.parametrize("case", PARITY_CASES)
@pytest.mark.parametrize("dispatch", ["batched", "naive"])
def test_logits_match_transformers(tmp_path, case, dispatch):
    model_type, overrides = PARITY_CASES[case]
    ref = hf_model(model_type, **overrides)
    err = max_logit_error(ref, save(ref, tmp_path), tokens(T=20), moe_dispatch=dispatch)
    print(f"{case} {dispatch}: max |logit error| {err:.2e}")
    assert err < 1e-5


def test_sharded_checkpoint_matches_transformers(tmp_path):
    ref = hf_model("olmoe")
    save(ref, tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    err = max_logit_error(ref, tmp_path, tokens())
    print(f"sharded: max |logit error| {err:.2e}")
    assert err < 1e-5


@pytest.mark.parametrize("case", ["olmoe", "olmoe-tied", "olmoe-rope-linear", "olmo2-gqa-head_dim",
                                  "olmo2-rope-dynamic"])
@pytest.mark.parametrize("shard_bytes", [2**31, 20_000])
def test_saved_model_loads_back_here_and_in_transformers(tmp_path, case, shard_bytes):
    """save_model is load_model's inverse, and transformers reads what it writes: a model loaded from a
    transformers checkpoint and saved again gives the reference's logits in both loaders, in one file or shards."""
    model_type, overrides = PARITY_CASES[case]
    ref = hf_model(model_type, **overrides)
    path = olmoe.save_model(olmoe.load_model(save(ref, tmp_path / "hf")), tmp_path / "ours", shard_bytes=shard_bytes)
    assert (len(list(path.glob("model-*.safetensors"))) > 1) == (shard_bytes < 2**31)
    again = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tokens(T=20)
    with torch.no_grad():
        assert (again(ids).logits - ref(ids).logits).abs().max() < 1e-5
    assert max_logit_error(ref, path, ids) < 1e-5


def test_saved_model_records_its_dtype(tmp_path):
    model = olmoe.load_model(save(hf_model("olmoe"), tmp_path / "hf"), dtype=torch.bfloat16)
    path = olmoe.save_model(model, tmp_path / "bf16")
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    assert {p.dtype for p in olmoe.load_model(path).parameters()} == {torch.bfloat16}


def test_older_config_keys(tmp_path):
    """OLMoE-1B-7B-0924's config.json predates rope_parameters and has no rms_norm_eps."""
    ref = hf_model("olmoe", rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=1000.0))
    save(ref, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["rope_parameters"], cfg["rms_norm_eps"]
    cfg.update(rope_theta=1000.0, rope_scaling={"type": "linear", "factor": 2.0}, some_future_key=[1, 2])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert olmoe.read_config(tmp_path).rms_norm_eps == 1e-5
    err = max_logit_error(ref, tmp_path, tokens())
    print(f"older config keys: max |logit error| {err:.2e}")
    assert err < 1e-5


def test_config_from_dict_reads_every_rope_spelling():
    base = dict(model_type="olmo2", hidden_size=64, num_attention_heads=4)
    new = olmoe.config_from_dict(dict(base, rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=7.0)))
    old = olmoe.config_from_dict(dict(base, rope_theta=7.0, rope_scaling=dict(rope_type="dynamic", factor=2.0)))
    older = olmoe.config_from_dict(dict(base, rope_theta=7.0, rope_scaling=dict(type="dynamic", factor=2.0)))
    assert new == old == older and (new.rope_type, new.rope_factor, new.rope_theta) == ("dynamic", 2.0, 7.0)
    assert new.head_dim == 16 and new.num_key_value_heads == 4
    with pytest.raises(ValueError, match="yarn"):
        olmoe.config_from_dict(dict(base, rope_scaling=dict(rope_type="yarn", factor=2.0)))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        olmoe.config_from_dict(dict(base, model_type="llama"))


def test_presets_have_the_released_shapes():
    c = olmoe.PRESETS["OLMoE-1B-7B-0924"]()
    assert (c.num_experts, c.num_experts_per_tok, c.intermediate_size, c.vocab_size) == (64, 8, 1024, 50304)
    c = olmoe.PRESETS["OLMo-2-0325-32B"]()
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (40, 8, 128, 100352)
    with torch.device("meta"):
        n = sum(p.numel() for p in olmoe.Transformer(olmoe.PRESETS["OLMoE-1B-7B-0924"]()).parameters())
    assert 6.8e9 < n < 7.0e9  # "OLMoE-1B-7B": 6.9B parameters in all


def test_rmsnorms_round_like_transformers_in_bf16():
    """OLMoE casts to bf16 before scaling by the weight, OLMo2 after; each matches its transformers twin bit for
    bit, and the two differ, so using the wrong one would be caught."""
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
    from transformers.models.olmoe.modeling_olmoe import OlmoeRMSNorm

    torch.manual_seed(0)
    x, w = torch.randn(64, 256).bfloat16(), (1 + torch.randn(256)).bfloat16()
    outs = []
    for ours, theirs in [(olmoe.OlmoeRMSNorm, OlmoeRMSNorm), (olmoe.Olmo2RMSNorm, Olmo2RMSNorm)]:
        a, b = ours(256, 1e-6).bfloat16(), theirs(256, 1e-6).bfloat16()
        a.weight.data.copy_(w), b.weight.data.copy_(w)
        assert torch.equal(a(x), b(x))
        outs.append(a(x))
    assert not torch.equal(*outs)


# --------------------------------------------------------------------------------------------------------------
# The mixture of experts: naive == batched == a dense oracle


def moe_layer(dtype=torch.float64, **overrides):
    config = olmoe.config_from_dict({**TINY_MOE, **overrides, "model_type": "olmoe"})
    torch.manual_seed(0)
    moe = olmoe.SparseMoE(config).to(dtype)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return moe


def route(moe, x):
    """The router as SparseMoE specifies it: float32 softmax, top K, optionally renormalised. (N, K) each."""
    top_w, top_i = (x @ moe.gate.weight.T).softmax(-1, dtype=torch.float32).topk(moe.K, dim=-1)
    if moe.norm_topk_prob:
        top_w = top_w / top_w.sum(-1, keepdim=True)
    return top_w.to(x.dtype), top_i


def dense_oracle(moe, x):
    """Every expert on every token, weighted by the router probability where the expert is in the top k, else 0."""
    top_w, top_i = route(moe, x)
    weight = torch.zeros(x.shape[0], moe.experts.num_experts, dtype=x.dtype).scatter(1, top_i, top_w)  # (N, E)
    gate, up = torch.einsum("nd,eid->nei", x, moe.experts.gate_up_proj).chunk(2, dim=-1)
    out = torch.einsum("nei,edi->ned", torch.nn.functional.silu(gate) * up, moe.experts.down_proj)  # (N, E, D)
    return torch.einsum("ned,ne->nd", out, weight)


@pytest.mark.parametrize("N", [1, 3, 50])
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_every_dispatch_and_moe_path_equals_the_dense_oracle(N, norm_topk_prob):
    moe = moe_layer(norm_topk_prob=norm_topk_prob)
    x = torch.randn(1, N, TINY["hidden_size"], dtype=torch.float64)
    expected = dense_oracle(moe, x[0])
    for dispatch in ["naive", "batched"]:
        moe.experts.dispatch = dispatch
        torch.testing.assert_close(moe(x)[0][0], expected, rtol=1e-12, atol=1e-12)
    for name, path in olmoe.MOE_PATHS.items():
        if name == "grouped":  # the fused kernel takes float32 and bf16, not float64
            got = path(x[0].float(), *[t.float() if t.is_floating_point() else t for t in route(moe, x[0])],
                       copy.deepcopy(moe.experts).float()).double()
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=name)
        else:
            torch.testing.assert_close(path(x[0], *route(moe, x[0]), moe.experts), expected, rtol=1e-12,
                                       atol=1e-12, msg=name)


def test_grouped_matmul_kernel_equals_the_loop_over_experts():
    x, w = torch.randn(40, 32), torch.randn(5, 16, 32)
    ends = torch.tensor([7, 7, 20, 33, 40])
    rows = torch.cat([x[a:b] @ w[e].T for e, (a, b) in enumerate([(0, 7), (7, 7), (7, 20), (20, 33), (33, 40)])])
    torch.testing.assert_close(olmoe.loop_mm(x, w, ends), rows)
    torch.testing.assert_close(olmoe.grouped_mm(x, w, ends), rows, rtol=1e-5, atol=1e-5)


# (device type, compute capability, dtype, compiled, N tokens) -> the MoE path, for OLMoE's K = 8 of E = 64.
# Written out from PyTorch's facts as moe_path's docstring states them, one device class at a time.
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
EXPECTED_MOE_PATH = [
    (("cpu", None, BF16, False, 1), "grouped"),  # CPUs have a fused grouped_mm, bf16 and float32 eager
    (("cpu", None, F32, False, 64), "grouped"),
    (("cpu", None, F32, True, 1), "pairs"),  # compiled decoding: a product on each chosen expert in place
    (("cpu", "amx", F32, True, 1), "pairs"),
    (("cpu", "amx", BF16, True, 7), "pairs"),  # 56 pairs, fewer than the 64 experts
    (("cpu", "amx", BF16, True, 8), "grouped"),
    (("cpu", None, F32, True, 64), "loop"),  # compiled float32: grouped_mm's shape function is bf16-only
    (("cpu", None, BF16, True, 64), "grouped"),
    (("cuda", (9, 0), BF16, False, 1), "grouped"),  # H100: the fused CUDA kernel
    (("cuda", (10, 0), BF16, True, 64), "grouped"),  # B200
    (("cuda", (9, 0), BF16, True, 1), "gathered"),
    (("cuda", (9, 0), F16, False, 64), "loop"),  # the fused kernel is bf16-only
    (("cuda", (8, 0), BF16, False, 1), "loop"),  # A100: grouped_mm would sync the host per call
    (("cuda", (8, 0), BF16, True, 1), "gathered"),  # ... and crash CUDA graph capture
    (("cuda", (8, 0), BF16, True, 64), "dense"),
    (("cuda", (8, 0), BF16, True, 2048), "loop"),  # a long compiled prefill: E/K times the FLOPs is too many
    (("cuda", (8, 9), BF16, True, 8), "dense"),  # RTX 4090, L4: a decode batch of 8
    (("cuda", (7, 5), F16, False, 8), "loop"),  # T4
    (("cuda", (7, 5), F16, True, 1), "gathered"),
    (("cuda", (12, 0), BF16, False, 8), "loop"),  # RTX 50: not a device the fused kernel is built for
    (("mps", None, BF16, False, 8), "loop"),
    (("mps", None, F16, True, 64), "dense"),
    (("rocm", None, BF16, False, 8), "loop"),  # AMD: grouped_mm is not fused in ROCm builds
]


@pytest.mark.parametrize("facts, path", EXPECTED_MOE_PATH)
def test_moe_path_is_the_right_kernel_for_each_device(facts, path):
    device_type, capability, dtype, compiled, N = facts
    assert olmoe.moe_path(device_type, capability, dtype, compiled, N, 8, 64) == path


@pytest.mark.parametrize("facts, path", [
    (("cpu", None), "sums"),  # a CPU without AMX: SDPA's flash kernel was 1.6-10x slower at T = 1
    (("cpu", "amx"), "sdpa"),  # not measured with AMX
    (("cuda", (9, 0)), "sdpa"),
    (("mps", None), "sdpa"),
])
def test_attention_path_is_the_right_kernel_for_each_device(facts, path):
    assert olmoe.attention_path(*facts) == path


@pytest.mark.parametrize("H, Hkv, B", [(4, 4, 1), (4, 2, 3), (6, 1, 2)])
def test_one_query_attention_equals_sdpa(H, Hkv, B):
    """attend_one, the decode step's attention written out, is SDPA's function: with MHA and GQA, per-row masks
    (left padding, unwritten slots), in float32 and bf16."""
    g = torch.Generator().manual_seed(0)
    S, Dh = 10, 16
    q = torch.randn(B, H, 1, Dh, generator=g)
    k, v = torch.randn(2, B, Hkv, S, Dh, generator=g)
    mask = torch.rand(B, 1, 1, S, generator=g) < 0.6
    mask[..., 4] = True  # every row sees at least one slot
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)]:
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask, enable_gqa=H != Hkv)
        y = olmoe.attend_one(q.to(dtype), k.to(dtype), v.to(dtype), mask)
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol)


def test_amd_gpus_are_not_taken_for_nvidia_ones(monkeypatch):
    """ROCm calls its devices "cuda", and an MI300 reports capability 9.4: the probe must not read that as an H100."""
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert olmoe.device_facts(torch.device("cuda")) == ("rocm", None)


@pytest.mark.parametrize("device", [("cpu", None), ("cuda", (9, 0)), ("cuda", (8, 0)), ("cuda", (7, 5)), ("mps", None)])
def test_simulated_devices_run_their_path_and_agree(device, monkeypatch):
    """Pretend the CPU is another device (the probe answers for it); moe_batched takes that device's path,
    which runs here on the CPU and gives the naive dispatch's output."""
    monkeypatch.setattr(olmoe, "device_facts", lambda _: device)
    taken = []
    for name, fn in list(olmoe.MOE_PATHS.items()):
        monkeypatch.setitem(olmoe.MOE_PATHS, name, lambda *a, _n=name, _f=fn: taken.append(_n) or _f(*a))
    moe = moe_layer(torch.bfloat16, hidden_size=64, intermediate_size=32, num_experts=64, num_experts_per_tok=8)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    top_w, top_i = route(moe, x)
    y = olmoe.moe_batched(x, top_w, top_i, moe.experts)
    assert taken == [olmoe.moe_path(*device, torch.bfloat16, False, 5, 8, 64)]
    ref = olmoe.moe_naive(x.double(), top_w.double(), top_i, copy.deepcopy(moe.experts).double())
    assert (y.double() - ref).norm() / ref.norm() < 1e-2  # bf16 rounding only


@pytest.mark.parametrize("device", [("cpu", None), ("cuda", (9, 0))])
def test_mixed_precision_training_takes_the_autocast_dtypes_path(device, monkeypatch):
    """Under bf16 autocast the experts' inputs and weights are float32 (master weights, a float32 norm before
    them), but their matmuls run in bf16: the path is the one for bf16 (grouped on an H100, not float32's loop),
    and it gives the naive dispatch's output and gradients to bf16 rounding."""
    monkeypatch.setattr(olmoe, "device_facts", lambda _: device)
    taken = []
    for name, fn in list(olmoe.MOE_PATHS.items()):
        monkeypatch.setitem(olmoe.MOE_PATHS, name, lambda *a, _n=name, _f=fn: taken.append(_n) or _f(*a))
    moe = moe_layer(torch.float32, hidden_size=64, intermediate_size=32, num_experts=64, num_experts_per_tok=8)
    x = torch.randn(40, 64)
    top_w, top_i = (t.detach() for t in route(moe, x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = olmoe.moe_batched(x, top_w, top_i, moe.experts)
    assert taken == ["grouped"] and y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    grads = [p.grad.clone() for p in moe.experts.parameters()]
    ref = olmoe.moe_naive(x.double(), top_w.double(), top_i, copy.deepcopy(moe.experts).double())
    assert (y.double() - ref).norm() / ref.norm() < 1e-2
    moe.experts.zero_grad()
    olmoe.moe_naive(x, top_w, top_i, moe.experts).square().sum().backward()
    for g, p in zip(grads, moe.experts.parameters()):
        assert p.grad.dtype == torch.float32 and (g - p.grad).norm() / p.grad.norm() < 3e-2


def test_gradients_equal_across_dispatches(tmp_path):
    path = save(hf_model("olmoe"), tmp_path)
    ids = tokens()
    grads = {}
    for dispatch in ["naive", "batched"]:
        model = olmoe.load_model(path, dtype=torch.float64, moe_dispatch=dispatch)
        model(ids, labels=ids).loss.backward()
        grads[dispatch] = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in grads["batched"].values())
    for name, g in grads["naive"].items():
        torch.testing.assert_close(grads["batched"][name], g, rtol=1e-10, atol=1e-12, msg=name)


# --------------------------------------------------------------------------------------------------------------
# The training-side forward


@pytest.mark.parametrize("padded", [False, True])
def test_loss_and_aux_loss_equal_transformers(tmp_path, padded):
    ref = hf_model("olmoe")
    model = olmoe.load_model(save(ref, tmp_path))
    ids = tokens(B=3, T=10)
    labels = ids.clone()
    labels[0, :4] = -100
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0
        labels[1, :3] = -100
    kw = dict(attention_mask=mask) if padded else {}
    with torch.no_grad():
        theirs = ref(ids, labels=labels, output_router_logits=True, **kw)
        ours = model(ids, labels, **kw)
    assert abs(theirs.aux_loss.item() - ours.aux_loss.item()) < 1e-6
    keep = mask.bool()
    assert (theirs.logits - ours.logits)[keep].abs().max() < 1e-5
    if not padded:  # with padding, transformers' loss also sees the padding rows' logits
        assert abs(theirs.loss.item() - ours.loss.item()) < 1e-6
        for r_theirs, r_ours in zip(theirs.router_logits, ours.router_logits):
            torch.testing.assert_close(r_ours.flatten(0, 1), r_theirs, rtol=1e-5, atol=1e-5)
    assert len(ours.router_logits) == TINY["num_hidden_layers"]


def test_z_loss_is_mean_squared_logsumexp_and_is_weighted_into_the_loss():
    logits = [torch.tensor([[[0.0, math.log(3.0)]]])]  # logsumexp = log 4
    assert abs(olmoe.router_z_loss(*olmoe.router_rows(logits)).item() - math.log(4.0) ** 2) < 1e-6
    config = olmoe.config_from_dict({**TINY_MOE, "model_type": "olmoe", "router_z_loss_coef": 0.5})
    torch.manual_seed(0)
    model = olmoe.Transformer(config)
    ids = tokens()
    out = model(ids, ids)
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, ce + 0.01 * out.aux_loss + 0.5 * out.z_loss)


# --------------------------------------------------------------------------------------------------------------
# Loader errors name what is wrong


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    return save(hf_model("olmoe"), tmp_path_factory.mktemp("good"))


def test_loader_errors(good_checkpoint, tmp_path):
    def load(sub, **kw):
        d = tmp_path / sub
        d.mkdir()
        return olmoe.load_model(copy_checkpoint(good_checkpoint, d, **kw))

    def drop(t):
        del t["model.layers.1.mlp.experts.3.up_proj.weight"]
        return t

    def reshape(t):
        t["model.layers.0.self_attn.k_norm.weight"] = torch.ones(5)
        return t

    with pytest.raises(olmoe.CheckpointError, match=r"missing, e.g. model.layers.1.mlp.experts.3.up_proj.weight"):
        load("missing", edit_tensors=drop)
    with pytest.raises(olmoe.CheckpointError, match=r"unexpected tensor model.layers.0.extra"):
        load("unexpected", edit_tensors=lambda t: {**t, "model.layers.0.extra": torch.zeros(2)})
    with pytest.raises(olmoe.CheckpointError, match=r"k_norm.weight has shape \(5,\), expected \(32,\)"):
        load("misshaped", edit_tensors=reshape)
    with pytest.raises(olmoe.CheckpointError, match="model_type 'llama'"):
        load("llama", edit_config=lambda c: {**c, "model_type": "llama"})
    with pytest.raises(olmoe.CheckpointError, match="no such directory"):
        olmoe.load_model(tmp_path / "nowhere")
    (tmp_path / "file").write_text("")
    with pytest.raises(olmoe.CheckpointError, match="not a directory"):
        olmoe.load_model(tmp_path / "file")


def test_loader_refuses_bad_files(good_checkpoint, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(olmoe.CheckpointError, match="config.json: not valid JSON"):
        olmoe.load_model(tmp_path)
    (tmp_path / "config.json").write_text((good_checkpoint / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(olmoe.CheckpointError, match="no model.safetensors"):
        olmoe.load_model(tmp_path)
    data = (good_checkpoint / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(olmoe.CheckpointError, match="model.safetensors: not a readable safetensors file"):
        olmoe.load_model(tmp_path)


def test_loader_casts_and_returns_an_eval_model(good_checkpoint):
    model = olmoe.load_model(good_checkpoint, dtype=torch.bfloat16)
    assert not model.training and isinstance(model.config, olmoe.OlmoeConfig)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(tokens()).logits.shape == (2, 12, TINY["vocab_size"])


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])  # transformers 5 writes dtype, older ones torch_dtype
def test_default_dtype_is_the_checkpoints_own(tmp_path, key):
    path = save(hf_model("olmoe").to(torch.bfloat16), tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("dtype", None), cfg.pop("torch_dtype", None)
    (path / "config.json").write_text(json.dumps({**cfg, key: "bfloat16"}))
    assert {p.dtype for p in olmoe.load_model(path).parameters()} == {torch.bfloat16}
    assert {p.dtype for p in olmoe.load_model(path, dtype=torch.float32).parameters()} == {torch.float32}


def test_loading_peaks_near_the_weights_bytes(tmp_path):
    """safetensors maps the file, and the pages a load touches stay resident until it is closed; the loader
    reopens the file so that a single-file checkpoint of W bytes loads within 1.3 W of the process's memory
    before loading (the bytes PyTorch itself takes)."""
    config = olmoe.OlmoeConfig(vocab_size=50304, hidden_size=1024, intermediate_size=512, num_hidden_layers=6,
                               num_attention_heads=8)
    benchmark.write_random_checkpoint(config, tmp_path, torch.bfloat16)
    assert [f.name for f in tmp_path.glob("*.safetensors")] == ["model.safetensors"]
    weights = (tmp_path / "model.safetensors").stat().st_size  # about 1.4 GB
    # Linux's VmHWM: the peak RSS of a fresh process
    probe = ("import re, sys, torch, olmoe; status = lambda: open('/proc/self/status').read();"
             "hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+) kB', status()).group(1)) * 1024;"
             "before = hwm(); olmoe.load_model(sys.argv[1]); print(before, hwm())")
    r = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, check=True)
    before, peak = map(int, r.stdout.split())
    print(f"weights {weights / 1e9:.2f} GB, peak RSS {peak / 1e9:.2f} GB, of which torch {before / 1e9:.2f} GB")
    assert peak - before <= 1.3 * weights


# --------------------------------------------------------------------------------------------------------------
# Config errors name the field and what was expected


CONFIG_ERRORS = {  # a config.json's fields -> the message that must name them
    "hidden_size not split by the heads": (dict(hidden_size=30, num_attention_heads=4),
                                           r"hidden_size=30 is not a multiple of num_attention_heads=4"),
    "query heads not shared by the kv heads": (dict(num_attention_heads=4, num_key_value_heads=3),
                                               r"num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    "unknown dtype": (dict(dtype="float33"), r"dtype 'float33' is not a ([\w-]+ )?torch dtype"),
    "unknown torch_dtype": (dict(torch_dtype="float33"), r"dtype 'float33' is not a ([\w-]+ )?torch dtype"),
    "integer dtype": (dict(dtype="int64"), r"dtype 'int64' is not a ([\w-]+ )?torch dtype"),
    "unknown activation": (dict(hidden_act="gelu"), r"hidden_act 'gelu' is not supported \(expected 'silu'\)"),
}


@pytest.mark.parametrize("case", CONFIG_ERRORS)
@pytest.mark.parametrize("model_type", ["olmoe", "olmo2"])
def test_config_errors_name_the_field(case, model_type):
    fields, message = CONFIG_ERRORS[case]
    with pytest.raises(ValueError, match=message):
        olmoe.config_from_dict({**dict(model_type=model_type, hidden_size=64, num_attention_heads=4), **fields})


@pytest.mark.parametrize("case", CONFIG_ERRORS)
def test_loader_config_errors_name_the_file_and_the_field(good_checkpoint, tmp_path, case):
    """read_config and load_model raise a CheckpointError that names config.json and then the field, before any
    tensor is read."""
    fields, message = CONFIG_ERRORS[case]
    cfg = json.loads((good_checkpoint / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "dtype": None, "torch_dtype": None, **fields}))
    for load in (olmoe.read_config, olmoe.load_model):
        with pytest.raises(olmoe.CheckpointError, match=r"config.json: " + message):
            load(tmp_path)


def test_an_explicit_head_dim_needs_no_split_of_hidden_size():
    """With head_dim given (as OLMo2 configs may), the heads need not divide hidden_size: no error, and the
    attention projections take the given width."""
    config = olmoe.config_from_dict(dict(model_type="olmo2", hidden_size=30, num_attention_heads=4, head_dim=8,
                                         intermediate_size=16, num_hidden_layers=1, vocab_size=10))
    assert config.head_dim == 8
    model = olmoe.Transformer(config)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (32, 30)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 10)
