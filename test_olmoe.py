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
import fast
import olmoe
from conftest import TINY, TINY_MOE, copy_checkpoint, dense_oracle, hf_model, moe_layer, route, save, tokens


def max_logit_error(ref, path, ids, fast_paths=False, **load_kwargs):
    """The largest difference between transformers' logits and olmoe.py's model's, alone or with fast.py's kernels."""
    ours = olmoe.load_model(path, **load_kwargs)
    if fast_paths:
        fast.apply(ours)
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
@pytest.mark.parametrize("fast_paths", [False, True])
def test_logits_match_transformers(tmp_path, case, dispatch, fast_paths):
    model_type, overrides = PARITY_CASES[case]
    ref = hf_model(model_type, **overrides)
    err = max_logit_error(ref, save(ref, tmp_path), tokens(T=20), fast_paths, moe_dispatch=dispatch)
    print(f"{case} {dispatch} {'fast' if fast_paths else 'reference'}: max |logit error| {err:.2e}")
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


@pytest.mark.parametrize("N", [1, 3, 50])
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_both_dispatches_equal_the_dense_oracle(N, norm_topk_prob):
    moe = moe_layer(norm_topk_prob=norm_topk_prob)
    x = torch.randn(1, N, TINY["hidden_size"], dtype=torch.float64)
    expected = dense_oracle(moe, x[0])
    for dispatch in ["naive", "batched"]:
        moe.experts.dispatch = dispatch
        torch.testing.assert_close(moe(x)[0][0], expected, rtol=1e-12, atol=1e-12)
    # the batched dispatch's grouped matmul, where it is one kernel (float32; float64 takes the loop above)
    got = olmoe.moe_batched(x[0].float(), *[t.float() if t.is_floating_point() else t for t in route(moe, x[0])],
                            copy.deepcopy(moe.experts).float()).double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_grouped_matmul_kernel_equals_the_loop_over_experts():
    x, w = torch.randn(40, 32), torch.randn(5, 16, 32)
    ends = torch.tensor([7, 7, 20, 33, 40])
    rows = torch.cat([x[a:b] @ w[e].T for e, (a, b) in enumerate([(0, 7), (7, 7), (7, 20), (20, 33), (33, 40)])])
    torch.testing.assert_close(olmoe.loop_mm(x, w, ends), rows)
    torch.testing.assert_close(olmoe.grouped_mm(x, w, ends), rows, rtol=1e-5, atol=1e-5)


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
