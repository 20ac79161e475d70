"""Tests for olmoe.py and generate.py: a specification to read, run on CPU in a few minutes.

Checkpoints are small random models written to tmp_path in the Hub's layout by transformers' save_pretrained,
which is also the reference the logits are compared against. At the end, the benchmarks (python test_olmoe.py)."""

import copy
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

import generate as gen
import olmoe
import quantize
import routing

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, eos_token_id=None, bos_token_id=None, pad_token_id=None)
TINY_MOE = dict(TINY, num_experts=8, num_experts_per_tok=2)


HF_CLASSES = {"olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM),
              "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM)}


def hf_model(model_type, seed=0, **overrides):
    """A random transformers model of a tiny config, its norms perturbed so that their weights matter."""
    cls = HF_CLASSES[model_type]
    torch.manual_seed(seed)
    model = cls[1](cls[0](**{**(TINY_MOE if model_type == "olmoe" else TINY), **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif "mlp.gate" in name:
                p.mul_(20)  # sharper routing, so the top-k choice is far from ties
    return model


def save(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    return path


def tokens(B=2, T=12, seed=1):
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


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
    (("cpu", None, F32, True, 1), "gathered"),  # compiled decoding: gather the 8 chosen experts
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


def copy_checkpoint(src, dst, edit_tensors=None, edit_config=None):
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(edit_config(cfg) if edit_config else cfg))
    tensors = load_file(src / "model.safetensors")
    save_file(edit_tensors(tensors) if edit_tensors else tensors, dst / "model.safetensors")
    return dst


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
                               num_attention_heads=8, dtype="bfloat16")
    with torch.device("meta"):
        layout = olmoe.hub_layout(olmoe.Transformer(config))
    tensors = {name: torch.full(shape, 0.01, dtype=torch.bfloat16) for name, (_, _, shape) in layout.items()}
    weights = sum(t.nbytes for t in tensors.values())  # about 1.4 GB
    save_file(tensors, tmp_path / "model.safetensors")
    del tensors
    (tmp_path / "config.json").write_text(json.dumps({**vars(config), "model_type": "olmoe"}))
    # Linux's VmHWM: the peak RSS of a fresh process
    probe = ("import re, sys, torch, olmoe; status = lambda: open('/proc/self/status').read();"
             "hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+) kB', status()).group(1)) * 1024;"
             "before = hwm(); olmoe.load_model(sys.argv[1]); print(before, hwm())")
    r = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, check=True)
    before, peak = map(int, r.stdout.split())
    print(f"weights {weights / 1e9:.2f} GB, peak RSS {peak / 1e9:.2f} GB, of which torch {before / 1e9:.2f} GB")
    assert peak - before <= 1.3 * weights


# --------------------------------------------------------------------------------------------------------------
# generate.py

TOKENIZER_VOCAB, MODEL_VOCAB = 300, 320  # the model's vocabulary is padded, as the released ones are


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    """A byte-level BPE tokenizer trained here, so multi-byte characters span several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog; café, naïve, 日本語"] * 20, trainer)
    assert tok.get_vocab_size() == TOKENIZER_VOCAB
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tok.save(str(path))
    return path


def gen_checkpoint(path, tokenizer_json, model_type="olmoe", **overrides):
    ref = hf_model(model_type, vocab_size=MODEL_VOCAB, max_position_embeddings=128, **overrides)
    save(ref, path)
    (path / "tokenizer.json").write_text(tokenizer_json.read_text())
    return ref, path


def greedy_by_recomputing(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(logits[:TOKENIZER_VOCAB].argmax().item())
    return ids[len(prompt):]


@pytest.mark.parametrize("model_type", ["olmoe", "olmo2"])
def test_cached_decoding_equals_recomputing_the_sequence(tmp_path, tokenizer_json, model_type):
    _, path = gen_checkpoint(tmp_path, tokenizer_json, model_type)
    model = olmoe.load_model(path)
    prompt = [5, 17, 42, 7, 99]
    with torch.no_grad():
        expected = greedy_by_recomputing(model, prompt, 20)
    assert gen.generate(model, [prompt], 20, vocab_size=TOKENIZER_VOCAB) == [expected]


@pytest.mark.parametrize("model_type", ["olmoe", "olmo2"])
def test_batch_of_prompts_equals_each_prompt_alone(tmp_path, tokenizer_json, model_type):
    _, path = gen_checkpoint(tmp_path, tokenizer_json, model_type)
    model = olmoe.load_model(path)
    prompts = [[3, 1, 4, 1, 5, 9, 2], [6], [5, 3, 5, 8]]
    alone = [gen.generate(model, [p], 12)[0] for p in prompts]
    assert gen.generate(model, prompts, 12) == alone


@pytest.mark.parametrize("model_type", ["olmoe", "olmo2"])
def test_greedy_output_equals_transformers_generate(tmp_path, tokenizer_json, model_type):
    ref, path = gen_checkpoint(tmp_path, tokenizer_json, model_type)
    model = olmoe.load_model(path)
    from tokenizers import Tokenizer

    prompt = Tokenizer.from_file(str(tokenizer_json)).encode("the lazy fox").ids
    theirs = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, pad_token_id=0,
                          suppress_tokens=list(range(TOKENIZER_VOCAB, MODEL_VOCAB)))[0, len(prompt):].tolist()
    assert gen.generate(model, [prompt], 24, vocab_size=TOKENIZER_VOCAB) == [theirs]


@pytest.mark.parametrize("device", [None, ("cuda", (8, 0))])
@pytest.mark.parametrize("prompts", [[[3, 1, 4, 1, 5], [9, 2]], [[3, 1, 4], [1, 5], [9], [2, 6], [5, 3]]])
def test_compiled_decode_step_gives_the_same_tokens(tmp_path, tokenizer_json, monkeypatch, device, prompts):
    """torch.compile of the decode step (CUDA graphs on a GPU) is a fast path of the same function. With 2 rows
    of K = 2 of E = 8 experts the compiled step gathers experts; with 5 rows a CPU loops over them (a graph
    break), and an A100, simulated here, computes them all (dense)."""
    if device:
        monkeypatch.setattr(olmoe, "device_facts", lambda _: device)
    _, path = gen_checkpoint(tmp_path, tokenizer_json)
    model = olmoe.load_model(path)
    assert gen.generate(model, prompts, 10, compile=True) == gen.generate(model, prompts, 10)


def test_compiled_decoding_is_kept_and_new_lengths_compile_nothing(tmp_path, tokenizer_json):
    """The compiled step lives beside the model, and the cache length is rounded up to a bucket: a later call
    with another prompt length and max_new_tokens reuses the compiled graph."""
    from torch._dynamo.utils import counters

    _, path = gen_checkpoint(tmp_path, tokenizer_json)
    model = olmoe.load_model(path)
    gen.generate(model, [[3, 1, 4, 1, 5]], 10, compile=True)
    step = model.compiled_decoding[2]
    counters.clear()
    out = gen.generate(model, [[9, 2, 6]], 20, compile=True)
    assert counters["stats"]["unique_graphs"] == 0 and model.compiled_decoding[2] is step
    assert out == gen.generate(model, [[9, 2, 6]], 20)
    gen.generate(model, [[9, 2, 6]], 70, compile=True)  # past the 64-slot bucket: one new graph, no more
    assert counters["stats"]["unique_graphs"] == 1


def sdpa_calls(monkeypatch):
    """Record what each attention call passes to scaled_dot_product_attention."""
    calls, real = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False):
        calls.append(dict(T=q.shape[2], mask=attn_mask is not None, causal=is_causal, gqa=enable_gqa,
                          kv_heads=k.shape[1]))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("prompts", [[[3, 1, 4, 1, 5, 9]], [[3, 1, 4, 1, 5, 9], [2, 6, 5, 3, 5, 8]]])
def test_unpadded_prefill_passes_no_mask(tmp_path, tokenizer_json, monkeypatch, prompts):
    """One prompt, or prompts of one length: the prefill is plain causal attention with no mask, which the flash
    kernel accepts; only decode steps, which read earlier slots of the cache, pass one."""
    _, path = gen_checkpoint(tmp_path, tokenizer_json)
    model = olmoe.load_model(path)
    calls = sdpa_calls(monkeypatch)
    gen.generate(model, prompts, 3)
    prefill = [c for c in calls if c["T"] == 6]
    assert len(prefill) == model.config.num_hidden_layers
    assert all(c["causal"] and not c["mask"] for c in prefill)
    assert all(c["mask"] for c in calls if c["T"] == 1)


def test_padded_gqa_prefill_keeps_gqa_off_the_math_kernel(tmp_path, tokenizer_json, monkeypatch):
    """Padding needs a mask; a mask with enable_gqa sends CUDA to the math kernel, whose float32 scores grow as
    H*T*S. So a padded prefill repeats K/V to all H heads instead, and still equals each prompt alone."""
    _, path = gen_checkpoint(tmp_path, tokenizer_json, "olmo2", num_key_value_heads=2)
    model = olmoe.load_model(path)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [5, 3]]
    calls = sdpa_calls(monkeypatch)
    batched = gen.generate(model, prompts, 6)
    prefill = [c for c in calls if c["T"] == 8]
    assert prefill and all(c["mask"] and not c["gqa"] and c["kv_heads"] == 4 for c in prefill)
    assert batched == [gen.generate(model, [p], 6)[0] for p in prompts]


@pytest.mark.parametrize("device, capability, macos14, expected", [
    ("cpu", None, None, torch.bfloat16),
    ("cuda", (9, 0), None, torch.bfloat16),  # H100
    ("cuda", (8, 0), None, torch.bfloat16),  # A100
    ("cuda", (7, 5), None, torch.float16),  # T4: bf16 only emulated
    ("cuda", (7, 0), None, torch.float16),  # V100
    ("mps", None, True, torch.bfloat16),
    ("mps", None, False, torch.float16),  # macOS 13: MPS has no bf16
])
def test_default_dtype_is_native_on_each_device(monkeypatch, device, capability, macos14, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Simulated GPU")
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: macos14)
    dtype, note = gen.native_dtype(torch.device(device), torch.bfloat16)
    assert dtype == expected
    assert (note is None) == (expected == torch.bfloat16)
    assert gen.native_dtype(torch.device(device), torch.float32) == (torch.float32, None)


def test_overflowing_logits_stop_with_one_line_naming_the_dtype(tmp_path, tokenizer_json, capsys):
    (tmp_path / "src").mkdir(), (tmp_path / "huge").mkdir()
    _, path = gen_checkpoint(tmp_path / "src", tokenizer_json)
    huge = copy_checkpoint(path, tmp_path / "huge", lambda t: {**t, "lm_head.weight": t["lm_head.weight"] * 1e6})
    (huge / "tokenizer.json").write_text(tokenizer_json.read_text())
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        gen.main(["--checkpoint", str(huge), "--prompt", "the", "--dtype", "float16", "--device", "cpu"])
    assert exit.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the logits overflowed") and "float16" in err[0]
    assert "--dtype bfloat16" in err[0]


def test_generation_stops_at_eos_per_row(tmp_path, tokenizer_json):
    _, path = gen_checkpoint(tmp_path, tokenizer_json)
    model = olmoe.load_model(path)
    prompts = [[1, 2, 3], [7, 8]]
    free = gen.generate(model, prompts, 10)
    eos = free[0][3]  # make row 0's fourth token the end of its text
    out = gen.generate(model, prompts, 10, eos_ids={eos})
    assert out == [row[: row.index(eos) + 1] if eos in row else row for row in free]
    assert len(out[0]) <= 4


def test_padded_vocabulary_ids_are_never_sampled(tmp_path, tokenizer_json):
    _, path = gen_checkpoint(tmp_path, tokenizer_json)
    model = olmoe.load_model(path)

    class FavourPadding(torch.nn.Linear):  # makes the padded ids by far the likeliest
        def forward(self, x):
            return super().forward(x) + 100 * (torch.arange(MODEL_VOCAB) >= TOKENIZER_VOCAB)

    model.lm_head = FavourPadding(TINY["hidden_size"], MODEL_VOCAB, bias=False)
    g = torch.Generator().manual_seed(0)
    for kw in [dict(), dict(temperature=1.0, generator=g)]:
        unrestricted = gen.generate(model, [[1, 2]], 8, **kw)[0]
        restricted = gen.generate(model, [[1, 2]], 8, vocab_size=TOKENIZER_VOCAB, **kw)[0]
        assert max(unrestricted) >= TOKENIZER_VOCAB and max(restricted) < TOKENIZER_VOCAB


def test_bytes_per_decode_step_counts_what_a_step_reads():
    config = olmoe.config_from_dict({**TINY_MOE, "model_type": "olmoe"})
    model = olmoe.Transformer(config)
    D, I, L, E, V = 32, 16, 2, 8, 96
    attention = 4 * D * D + 2 * D  # q, k, v, o and the q, k norms
    per_layer = attention + 2 * D + E * D  # the two block norms and the router
    dense = L * per_layer + D + V * D  # the final norm and lm_head
    B, S, hit = 3, 10, 5.5
    kv_cache = 2 * L * B * S * D
    expected = 4 * (dense + B * D + kv_cache + hit * 3 * I * D)  # float32; one embedding row per sequence
    assert gen.bytes_per_decode_step(model, B, S, hit) == expected


def test_sampling_is_a_pure_function_of_logits_and_generator():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    draw = lambda seed, **kw: gen.sample(logits, generator=torch.Generator().manual_seed(seed), **kw)  # noqa: E731
    assert torch.equal(draw(1, temperature=1.0), draw(1, temperature=1.0))
    assert not torch.equal(draw(1, temperature=1.0), draw(2, temperature=1.0))
    assert torch.equal(draw(0), logits.argmax(-1))
    assert torch.equal(draw(3, temperature=1.0, top_k=1), logits.argmax(-1))
    assert torch.equal(draw(3, temperature=1.0, top_p=1e-6), logits.argmax(-1))
    top3 = logits.topk(3).indices
    picks = torch.stack([draw(s, temperature=5.0, top_k=3) for s in range(50)])  # (50, 4)
    assert all(p in top3[row] for row in range(4) for p in picks[:, row])


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "generate.py", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def test_cli_end_to_end(tmp_path, tokenizer_json):
    _, path = gen_checkpoint(tmp_path, tokenizer_json)
    prompt = "café naïve"
    r = run_cli("--checkpoint", str(path), "--prompt", prompt, "--max-new-tokens", "16", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    expected = gen.generate(olmoe.load_model(path), [tok.encode(prompt).ids], 16, vocab_size=TOKENIZER_VOCAB)[0]
    assert r.stdout == prompt + tok.decode(expected) + "\n"  # the streamed pieces add up to the whole text
    stderr = r.stderr.strip().splitlines()  # one line of statistics, and no warnings before it
    assert len(stderr) == 1 and re.fullmatch(r"prefill \d+ tokens in \d+ ms \| decode [\d.]+ tok/s \| [\d.]+ GB/s \| "
                                             r"peak memory .*", stderr[0])

    r = run_cli("--checkpoint", str(path), "--prompt", "the", "--prompt", "lazy dog", "--max-new-tokens", "4",
                "--quantize", "int8")
    assert r.returncode == 0 and r.stdout.startswith("the") and "\n\nlazy dog" in r.stdout


def test_cli_offline_hub_id_without_cache_is_one_clear_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    r = run_cli("--checkpoint", "allenai/OLMoE-1B-7B-0924", "--prompt", "hi", env=env)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "Connect once to download it" in r.stderr


# Shaped like OLMoE-1B-7B-Instruct's template: Jinja blocks on their own lines, trimmed as transformers does.
CHAT_TEMPLATE = """{{ bos_token }}{% for message in messages %}
{% if message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] }}
{% elif message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""


def test_chat_prompt_renders_as_transformers_renders_it(tokenizer_json):
    config = {"chat_template": CHAT_TEMPLATE, "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_json), bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE).apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False,
                                                          add_generation_prompt=True)
    assert gen.render_chat(config, "Hi there") == theirs == "<|endoftext|><|user|>\nHi there\n<|assistant|>\n"


def test_cli_chat_wraps_the_prompt(tmp_path, tokenizer_json, capsys):
    _, path = gen_checkpoint(tmp_path, tokenizer_json)
    argv = ["--checkpoint", str(path), "--prompt", "Hi", "--max-new-tokens", "3", "--chat"]
    with pytest.raises(SystemExit):
        gen.main(argv)
    assert "has no chat_template" in capsys.readouterr().err
    config = {"chat_template": CHAT_TEMPLATE, "bos_token": "<|endoftext|>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    gen.main(argv)
    assert capsys.readouterr().out.startswith("Hi")


@pytest.fixture(scope="module")
def cli_checkpoints(tmp_path_factory, tokenizer_json):
    """One good checkpoint and one broken in each way a user can meet, by name."""
    root = tmp_path_factory.mktemp("cli")
    _, good = gen_checkpoint(root / "good", tokenizer_json)

    def variant(name, edit_tensors=None, edit_config=None, raw_config=None, truncate=False, no_tokenizer=False,
                files=None):
        d = root / name
        d.mkdir()
        copy_checkpoint(good, d, edit_tensors=edit_tensors, edit_config=edit_config)
        if raw_config is not None:
            (d / "config.json").write_text(raw_config)
        if truncate:
            data = (d / "model.safetensors").read_bytes()
            (d / "model.safetensors").write_bytes(data[: len(data) - 100])
        if not no_tokenizer:
            (d / "tokenizer.json").write_text(tokenizer_json.read_text())
        for file, text in (files or {}).items():
            (d / file).write_text(text)
        return d

    def pop(t):
        del t["model.layers.0.self_attn.q_proj.weight"]
        return t

    def reshape(t):
        t["lm_head.weight"] = t["lm_head.weight"][:10]
        return t

    (root / "a_file").write_text("")
    return dict(good=good, missing_dir=root / "nowhere", a_file=root / "a_file",
                bad_json=variant("bad_json", raw_config="{"), llama=variant("llama", edit_config=lambda c: {
                    **c, "model_type": "llama"}), truncated=variant("truncated", truncate=True),
                missing_tensor=variant("missing_tensor", edit_tensors=pop),
                misshaped=variant("misshaped", edit_tensors=reshape), no_tokenizer=variant("no_tok", no_tokenizer=True),
                bad_tokenizer=variant("bad_tok", files={"tokenizer.json": "{bad"}),
                bad_generation_config=variant("bad_gen", files={"generation_config.json": "{bad"}))


BAD_INPUTS = {
    "missing checkpoint": (dict(checkpoint="missing_dir"), "no such directory"),
    "checkpoint is a file": (dict(checkpoint="a_file"), "not a directory"),
    "config not JSON": (dict(checkpoint="bad_json"), "config.json: not valid JSON"),
    "unknown model_type": (dict(checkpoint="llama"), "model_type 'llama' is not 'olmo2' or 'olmoe'"),
    "truncated safetensors": (dict(checkpoint="truncated"), "not a readable safetensors file"),
    "missing tensor": (dict(checkpoint="missing_tensor"), "missing, e.g. model.layers.0.self_attn.q_proj.weight"),
    "mis-shaped tensor": (dict(checkpoint="misshaped"), r"lm_head.weight has shape \(10, 32\), expected \(320, 32\)"),
    "no tokenizer.json": (dict(checkpoint="no_tokenizer"), "tokenizer.json: missing"),
    "broken tokenizer.json": (dict(checkpoint="bad_tokenizer"), "tokenizer.json: not a readable tokenizer"),
    "generation_config not JSON": (dict(checkpoint="bad_generation_config"), "generation_config.json: not valid JSON"),
    "beyond context": (dict(args=["--max-new-tokens", "200"]), "exceeds the context length of 128"),
    "max-new-tokens 0": (dict(args=["--max-new-tokens", "0"]), "max_new_tokens must be at least 1"),
    "negative temperature": (dict(args=["--temperature", "-1"]), "temperature >= 0"),
    "top-p 0": (dict(args=["--top-p", "0"]), "0 < top_p <= 1"),
    "top-p above 1": (dict(args=["--top-p", "1.5"]), "0 < top_p <= 1"),
    "negative top-k": (dict(args=["--top-k", "-2"]), "top_k >= 0"),
    "unknown dtype": (dict(args=["--dtype", "float8"]), "--dtype 'float8': expected one of"),
    "empty prompt": (dict(prompt=""), "prompt 1 is empty"),
    "cuda without a GPU": (dict(args=["--device", "cuda"]), "no CUDA GPU is available"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_cli_bad_input_is_one_line_error(case, cli_checkpoints, capsys):
    spec, message = BAD_INPUTS[case]
    if case == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    argv = ["--checkpoint", str(cli_checkpoints[spec.get("checkpoint", "good")]),
            "--prompt", spec.get("prompt", "the fox"), "--max-new-tokens", "4", *spec.get("args", [])]
    with pytest.raises(SystemExit) as exit_info:
        gen.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code != 0
    assert err.count("\n") == 1 and err.startswith("error: ") and re.search(message, err), err


# --------------------------------------------------------------------------------------------------------------
# quantize.py: weight-only int8 and int4. References come from the schemes' definitions, never from quantize.py;
# GPU kernels that cannot run here are simulated (olmoe.device_facts, and a plain model of tinygemm's contract).


QUANT_WIDTHS = dict(hidden_size=256, intermediate_size=128)  # multiples of the int4 group size, 128


def save_hf(path, model_type="olmoe", seed=0, **overrides):
    return save(hf_model(model_type, seed, **{**QUANT_WIDTHS, **overrides}), path)


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    return save_hf(tmp_path_factory.mktemp("moe"))


def rel_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# --------------------------------------------------------------------------------------------------------------
# The scheme, from its definition


def reference_dequantized(w, bits, G=128):
    """The float32 weight the scheme represents: absmax/127 per row (int8) or absmax/7 per group of G (int4)."""
    w = w.float()
    if bits == 8:
        s = w.abs().amax(-1, keepdim=True) / 127
        return (w / s).round().clamp(-127, 127) * s
    g = w.unflatten(-1, (-1, G))
    s = g.abs().amax(-1, keepdim=True) / 7
    return ((g / s).round().clamp(-8, 7) * s).flatten(-2)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_round_trip_error_is_at_most_half_a_step(bits, scale_dtype):
    w = torch.randn(3, 40, 256) * torch.rand(3, 40, 1)  # rows of different magnitudes
    q, scale = quantize.quantize(w, bits, group_size=64, scale_dtype=scale_dtype)
    back = quantize.dequantize(q, scale, torch.float32)
    step = scale.float()[..., None] if bits == 8 else scale.float().repeat_interleave(64, dim=-1)  # per element
    assert q.shape[-1] == (256 if bits == 8 else 128) and scale.dtype == scale_dtype
    assert ((back - w).abs() <= step / 2 * (1 + 1e-6)).all()  # half a step of the scale as stored
    assert (back - w).abs().max() > 0  # it did round: the bound above is not vacuous


def test_int4_packs_two_inputs_a_byte_the_even_one_high():
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1], w[0, 3] = 7.0, -7.0, 3.0  # absmax 7: scale 1, so q = w, stored as q + 8
    q, scale = quantize.quantize(w, 4, group_size=32)
    assert scale.item() == 1.0
    assert q[0, :2].tolist() == [(7 + 8) << 4 | (-7 + 8), 8 << 4 | (3 + 8)]


def test_clip_search_never_rounds_a_group_worse_than_absmax():
    w = torch.randn(16, 512) * torch.rand(16, 512).pow(4) * 3  # heavy-tailed rows: clipping should pay somewhere
    err = [(quantize.dequantize(*quantize.quantize(w, 4, 128, clip_search=c), torch.float32) - w)
           .unflatten(-1, (-1, 128)).square().sum(-1) for c in (False, True)]  # (16, 4) squared error per group
    assert (err[1] <= err[0] * (1 + 1e-6)).all()  # r = 1 (plain absmax) is one of the candidates
    assert err[1].sum() < 0.95 * err[0].sum()


# --------------------------------------------------------------------------------------------------------------
# Kernels: which runs where, and each one equals the dequantized weight


@pytest.mark.parametrize("facts, dtype, int8, int4", [
    (("cpu", None), torch.bfloat16, "int8pack", "int4pack-cpu"),
    (("cpu", None), torch.float32, "int8pack", "int4pack-cpu"),
    (("cuda", (7, 5)), torch.bfloat16, "int8-linear", "dequant"),  # tinygemm needs Ampere's bf16 MMA
    (("cuda", (8, 0)), torch.bfloat16, "int8-linear", "tinygemm"),
    (("cuda", (9, 0)), torch.bfloat16, "int8-linear", "tinygemm"),
    (("cuda", (9, 0)), torch.float16, "int8-linear", "dequant"),  # CUDA tinygemm takes bf16 only
    (("mps", None), torch.float16, "int8pack", "tinygemm"),
    (("xpu", None), torch.bfloat16, "dequant", "dequant"),  # a device no rule names takes the portable path
])
def test_kernel_choice_per_device(facts, dtype, int8, int4):
    assert quantize.choose_kernel(8, *facts, dtype, 2048, 2048, 128) == int8
    assert quantize.choose_kernel(4, *facts, dtype, 2048, 2048, 128) == int4


@pytest.mark.parametrize("facts", [("cpu", None), ("cuda", (8, 0)), ("mps", None)])
def test_kernel_choice_respects_the_kernels_shape_limits(facts):
    dtype = torch.bfloat16
    assert quantize.choose_kernel(4, *facts, dtype, 2048, 2048, 48) == "dequant"  # group size not in {32..256}
    assert quantize.choose_kernel(4, *facts, dtype, 36, 2048, 128) == "dequant"  # out not a multiple of 8 / 16
    if facts[0] == "mps":
        assert quantize.choose_kernel(8, *facts, dtype, 48, 2048, 128) == "dequant"  # MPS int8: out % 32


def fake_tinygemm(monkeypatch):
    """Stand-ins for CUDA/MPS tinygemm on a CPU, written from its contract: the packer takes uint8 (N, K/2), even k
    in the high nibble, and returns int32 [N/8, K/(16*inner_k_tiles), 32, inner_k_tiles/2] (here the same bytes in
    plain order); the matmul takes scales_and_zeros [K/G, N, 2] and dequantizes (q - 8) * scale + zero."""
    def convert(w, inner_k_tiles):
        assert w.dtype == torch.uint8 and inner_k_tiles in (2, 4, 8) and w.shape[1] * 2 % (16 * inner_k_tiles) == 0
        N, K = w.shape[0], w.shape[1] * 2
        return w.contiguous().view(torch.int32).reshape(N // 8, K // (16 * inner_k_tiles), 32, inner_k_tiles // 2)

    def mm(x, packed, G, sz):
        N = sz.shape[1]
        b = packed.reshape(-1).view(torch.uint8).view(N, -1)  # (N, K/2)
        q = torch.stack((b >> 4, b & 15), dim=-1).flatten(-2).float()  # (N, K)
        scale, zero = (sz[..., j].T.float().repeat_interleave(G, dim=1) for j in (0, 1))  # (N, K) each
        return x @ ((q - 8) * scale + zero).to(x.dtype).T

    monkeypatch.setattr(torch, "_convert_weight_to_int4pack", convert)
    monkeypatch.setattr(torch, "_weight_int4pack_mm", mm)


KERNEL_PATHS = [(8, "int8pack"), (8, "int8-linear"), (8, "dequant"),
                (4, "int4pack-cpu"), (4, "tinygemm"), (4, "dequant")]


@pytest.mark.parametrize("bits, kernel", KERNEL_PATHS)
def test_quant_linear_equals_a_matmul_with_the_dequantized_weight(bits, kernel, monkeypatch):
    fake_tinygemm(monkeypatch)
    w, x = torch.randn(64, 256), torch.randn(2, 5, 256)
    layer = quantize.QuantLinear(64, 256, bits, 128, torch.float32, "cpu")
    layer.load("weight", (), w)
    layer.use(kernel)
    torch.testing.assert_close(layer(x), x @ reference_dequantized(w, bits).T, rtol=1e-4, atol=1e-4)
    last = x[:, -1:]  # what lm_head gets in generation: rows that are not contiguous in memory
    torch.testing.assert_close(layer(last), last @ reference_dequantized(w, bits).T, rtol=1e-4, atol=1e-4)


def dequantized_experts_oracle(x, top_w, top_i, gate_up, down):
    """Every token through each of its K experts, one at a time: y_n = sum_k w_nk * down_e(silu(gate_e x) * up_e x)."""
    y = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for w, e in zip(top_w[n], top_i[n]):
            gate, up = (gate_up[e] @ x[n]).chunk(2)
            y[n] += w * (down[e] @ (F.silu(gate) * up))
    return y


@pytest.mark.parametrize("bits, kernel", KERNEL_PATHS)
def test_quant_experts_equal_the_dense_oracle_over_dequantized_experts(bits, kernel, monkeypatch):
    fake_tinygemm(monkeypatch)
    E, D, I, N, K = 8, 256, 128, 5, 3
    gate_up, down = torch.randn(E, 2 * I, D), torch.randn(E, D, I)
    experts = quantize.QuantExperts(E, D, I, bits, 128, torch.float32, "cpu")
    for e in range(E):  # as the loader hands them over: gate and up rows separately, down whole
        experts.load("gate_up_proj", (e, slice(0, I)), gate_up[e, :I])
        experts.load("gate_up_proj", (e, slice(I, 2 * I)), gate_up[e, I:])
        experts.load("down_proj", (e,), down[e])
    experts.use(kernel)
    x = torch.randn(N, D)
    top_w, top_i = torch.randn(N, E).softmax(-1).topk(K, dim=-1)  # (N, K): 5 tokens over some of the 8 experts
    expected = dequantized_experts_oracle(x, top_w, top_i, reference_dequantized(gate_up, bits),
                                          reference_dequantized(down, bits))
    torch.testing.assert_close(experts(x, top_w, top_i), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


# --------------------------------------------------------------------------------------------------------------
# Loading: what is swapped, what is allocated, what each device gets


def portable_model(path, kind, **kw):
    """The same model with every kernel choice forced to the portable path (dequantize, then F.linear)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quantize, "choose_kernel", lambda *a: "dequant")
        return quantize.load_model(path, kind, **kw)


@pytest.mark.parametrize("kind, tolerance", [("int8", 0.05), ("int4", 0.5)])
def test_quantized_model_stays_close_to_the_float_model(moe_checkpoint, kind, tolerance):
    ids = tokens(T=16)
    with torch.no_grad():
        ref = olmoe.load_model(moe_checkpoint)(ids).logits
        packed = quantize.load_model(moe_checkpoint, kind)
        out = packed(ids).logits
        portable = portable_model(moe_checkpoint, kind)(ids).logits
    assert {k for m in packed.modules() if isinstance(m, quantize.Quantized) for k in m.kernels.values()} == \
        {"int8pack" if kind == "int8" else "int4pack-cpu"}  # on this CPU, every layer takes the packed kernel
    torch.testing.assert_close(out, portable, rtol=1e-4, atol=1e-4)
    assert 0 < rel_error(out, ref) < tolerance


def test_compiled_decoding_gives_the_same_tokens(moe_checkpoint):
    import generate

    model = quantize.load_model(moe_checkpoint, "int8")
    prompts = [[1, 2, 3], [4, 5]]  # padded: the mask path too
    assert generate.generate(model, prompts, 6, compile=True) == generate.generate(model, prompts, 6)


def test_what_is_quantized_and_what_is_not(tmp_path):
    path = save_hf(tmp_path, tie_word_embeddings=True)
    model = quantize.load_model(path, "int8")
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, quantize.QuantLinear)
    assert isinstance(layer.mlp.experts, quantize.QuantExperts)
    assert type(layer.mlp.gate) is torch.nn.Linear  # the router picks the experts: it stays in float
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: it is the embedding


def test_olmo2_mlps_are_quantized_and_stay_close(tmp_path):
    path = save_hf(tmp_path, "olmo2")
    ids = tokens()
    model = quantize.load_model(path, "int8")
    assert isinstance(model.model.layers[0].mlp.gate_proj, quantize.QuantLinear)
    with torch.no_grad():
        assert 0 < rel_error(model(ids).logits, olmoe.load_model(path)(ids).logits) < 0.05


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_loading_never_allocates_the_float_model(moe_checkpoint, monkeypatch, kind):
    float_bytes = sum(t.nbytes for t in olmoe.load_model(moe_checkpoint).state_dict().values())
    allocated = []
    to_empty = torch.nn.Module.to_empty

    def recording_to_empty(self, **kw):  # the loader's one allocation of the model's storage
        out = to_empty(self, **kw)
        allocated.append(sum(t.nbytes for t in self.state_dict().values()))
        return out

    monkeypatch.setattr(torch.nn.Module, "to_empty", recording_to_empty)
    model = quantize.load_model(moe_checkpoint, kind)
    assert allocated == [sum(t.nbytes for t in model.state_dict().values())]  # repacking allocated nothing more
    assert allocated[0] < (0.35 if kind == "int8" else 0.25) * float_bytes
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.dtype == (torch.int8 if kind == "int8" else torch.uint8)
    assert model.model.layers[0].mlp.gate.weight.dtype == torch.float32  # the router stays in float


def test_int4_group_size_must_divide_the_inputs(tmp_path):
    path = save_hf(tmp_path, hidden_size=32, intermediate_size=16)
    with pytest.raises(ValueError, match="lm_head: 32 inputs are not a multiple of the int4 group size 128"):
        quantize.load_model(path, "int4")
    assert quantize.load_model(path, "int4", group_size=16)(tokens()).logits.isfinite().all()


@pytest.mark.parametrize("facts, dtype, int8, int4", [
    (("cuda", (8, 0)), torch.bfloat16, "int8-linear", "tinygemm"),
    (("mps", None), torch.float32, "int8pack", "tinygemm"),
])
def test_a_simulated_gpu_loads_its_kernels_and_gives_the_portable_answer(moe_checkpoint, monkeypatch, facts, dtype,
                                                                          int8, int4, capsys):
    ids = tokens()
    expected = {k: portable_model(moe_checkpoint, k, dtype=dtype)(ids).logits for k in ("int8", "int4")}
    fake_tinygemm(monkeypatch)
    monkeypatch.setattr(olmoe, "device_facts", lambda device: facts)
    for kind, kernel in (("int8", int8), ("int4", int4)):
        model = quantize.load_model(moe_checkpoint, kind, dtype=dtype)
        experts = model.model.layers[0].mlp.experts
        assert experts.kernels == {"gate_up_proj": kernel, "down_proj": kernel}
        if kernel == "tinygemm":  # repacked expert by expert into int32 tiles, in the bytes it had
            assert experts.gate_up_proj.dtype == torch.int32 and experts.gate_up_proj.shape[0] == 8
        with torch.no_grad():
            # bf16 rounds differently when int8-linear scales the product and the portable path the weight: a
            # percent or so on these small logits; a wrong product would be off by order 1
            assert rel_error(model(ids).logits, expected[kind]) < 3e-2
    assert capsys.readouterr().err == ""  # every kernel passed its check


# --------------------------------------------------------------------------------------------------------------
# The probe: a kernel that raises or is wrong is replaced by the portable path, with one line on stderr


def wrong_by_half(kernel):
    return lambda *args: kernel(*args) * 1.5


@pytest.mark.parametrize("kind, sabotage", [
    ("int8", lambda mp: mp.setattr(torch, "_weight_int8pack_mm", lambda *a: (_ for _ in ()).throw(RuntimeError("no")))),
    ("int8", lambda mp: mp.setattr(torch, "_weight_int8pack_mm", wrong_by_half(torch._weight_int8pack_mm))),
    ("int4", lambda mp: mp.setattr(torch, "_weight_int4pack_mm_for_cpu",
                                   wrong_by_half(torch._weight_int4pack_mm_for_cpu))),
    # CUDA's tinygemm simulated on a CPU, for real: its packer has no CPU kernel and raises
    ("int4", lambda mp: mp.setattr(olmoe, "device_facts", lambda device: ("cuda", (8, 0)))),
])
def test_a_kernel_that_fails_its_check_falls_back_with_one_stderr_line(moe_checkpoint, monkeypatch, capsys, kind,
                                                                        sabotage):
    ids = tokens()
    dtype = torch.bfloat16
    with torch.no_grad():
        expected = portable_model(moe_checkpoint, kind, dtype=dtype)(ids).logits
        sabotage(monkeypatch)
        model = quantize.load_model(moe_checkpoint, kind, dtype=dtype)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("quantize: kernel ") and "portable path" in err, err
        assert {k for m in model.modules() if isinstance(m, quantize.Quantized) for k in m.kernels.values()} == \
            {"dequant"}
        assert rel_error(model(ids).logits, expected) < 1e-3  # the same path: equal up to bf16 rounding order


def test_unknown_kind_is_a_clear_error(moe_checkpoint):
    with pytest.raises(ValueError, match="quantize 'int3': expected 'int8' or 'int4'"):
        quantize.load_model(moe_checkpoint, "int3")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


# --------------------------------------------------------------------------------------------------------------
# routing.py and tour.ipynb: the analyses, on routings small enough to count by hand

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
    assert raw["saturation"] == [1.0, 1.0]  # a checkpoint against itself agrees on every expert
    report = (out / "report.md").read_text()
    for heading in ["Load per layer", "specialised to each domain", "co-activated", "Tokens each expert",
                    "saturation"]:
        assert heading in report
    if _has_matplotlib():
        for name in ["load.png", "domains.png", "coactivation.png", "tokens.png"]:
            assert (out / name).stat().st_size > 1000
    else:
        assert "matplotlib is not installed" in r.stderr


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


def test_tour_notebook_runs_top_to_bottom(routing_checkpoint, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OLMOE_CHECKPOINT", str(routing_checkpoint))
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


# --------------------------------------------------------------------------------------------------------------
# benchmark.py --check, the self-check a user runs on their GPU, here on the CPU


def test_self_check_passes_on_this_device():
    import benchmark

    results = benchmark.check_paths(torch.device("cpu"), models=("OLMoE",), batches=(8,))
    assert len(results) == 3 + 3 * len(olmoe.MOE_PATHS)
    assert [what for what, ok, _ in results if not ok] == []
