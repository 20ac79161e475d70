"""Tests for olmoe.py and generate.py: a specification to read, run on CPU in a few minutes.

Checkpoints are small random models written to tmp_path in the Hub's layout by transformers' save_pretrained,
which is also the reference the logits are compared against."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import olmoe

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, eos_token_id=None, bos_token_id=None, pad_token_id=None)
TINY_MOE = dict(TINY, num_experts=8, num_experts_per_tok=2)


def hf_model(model_type, seed=0, **overrides):
    """A random transformers model of a tiny config, its norms perturbed so that their weights matter."""
    cls = {"olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM),
           "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM)}[model_type]
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
    assert max_logit_error(ref, tmp_path, tokens()) < 1e-5


def test_older_config_keys(tmp_path):
    """OLMoE-1B-7B-0924's config.json predates rope_parameters and has no rms_norm_eps."""
    ref = hf_model("olmoe", rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=1000.0))
    save(ref, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["rope_parameters"], cfg["rms_norm_eps"]
    cfg.update(rope_theta=1000.0, rope_scaling={"type": "linear", "factor": 2.0}, some_future_key=[1, 2])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert olmoe.read_config(tmp_path).rms_norm_eps == 1e-5
    assert max_logit_error(ref, tmp_path, tokens()) < 1e-5


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


def dense_oracle(moe, x):
    """Every expert on every token, weighted by the router probability where the expert is in the top k, else 0."""
    probs = (x @ moe.gate.weight.T).softmax(-1, dtype=torch.float32)  # (N, E), float32 as the router specifies
    top_w, top_i = probs.topk(moe.K, dim=-1)
    if moe.norm_topk_prob:
        top_w = top_w / top_w.sum(-1, keepdim=True)
    probs, top_w = probs.to(x.dtype), top_w.to(x.dtype)
    weight = torch.zeros_like(probs).scatter(1, top_i, top_w)  # (N, E)
    gate, up = torch.einsum("nd,eid->nei", x, moe.experts.gate_up_proj).chunk(2, dim=-1)
    out = torch.einsum("nei,edi->ned", torch.nn.functional.silu(gate) * up, moe.experts.down_proj)  # (N, E, D)
    return torch.einsum("ned,ne->nd", out, weight)


@pytest.mark.parametrize("N", [1, 3, 50])  # 1 and 3 tokens take the gather path of moe_batched, 50 the grouped one
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_batched_dispatch_equals_naive_and_dense_oracle(N, norm_topk_prob):
    moe = moe_layer(norm_topk_prob=norm_topk_prob)
    x = torch.randn(1, N, TINY["hidden_size"], dtype=torch.float64)
    expected = dense_oracle(moe, x[0])
    for dispatch in ["naive", "batched"]:
        moe.dispatch = dispatch
        torch.testing.assert_close(moe(x)[0][0], expected, rtol=1e-12, atol=1e-12)


def test_grouped_matmul_kernel_equals_fallback():
    """torch._grouped_mm (float32) and the per-expert loop (float64) compute the same grouped product."""
    x, w = torch.randn(40, 32, dtype=torch.float64), torch.randn(5, 16, 32, dtype=torch.float64)
    ends = torch.tensor([7, 7, 20, 33, 40])
    fallback = olmoe.grouped_mm(x, w, ends)
    torch.testing.assert_close(olmoe.grouped_mm(x.float(), w.float(), ends).double(), fallback, rtol=1e-5, atol=1e-5)
    rows = torch.cat([x[a:b] @ w[e].T for e, (a, b) in enumerate([(0, 7), (7, 7), (7, 20), (20, 33), (33, 40)])])
    torch.testing.assert_close(fallback, rows)


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
    assert abs(olmoe.router_z_loss(logits).item() - math.log(4.0) ** 2) < 1e-6
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
