"""Tests for quantize.py: weight-only int8 and int4. References come from the schemes' definitions, never
from quantize.py; GPU kernels that cannot run here are simulated (fast.device_facts, and a plain model of
tinygemm's contract)."""

import sys

import pytest
import torch
import torch.nn.functional as F

import fast
import olmoe
import quantize
from conftest import hf_model, save, tokens

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
    (("cpu", "avx512"), torch.bfloat16, "int8pack", "int4pack-cpu"),
    (("cpu", "avx512"), torch.float32, "int8pack", "int4pack-cpu"),
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


@pytest.mark.parametrize("facts", [("cpu", "avx512"), ("cpu", "avx2"), ("cuda", (8, 0)), ("mps", None)])
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


@pytest.mark.parametrize("kind, tolerance, agreement", [("int8", 0.05, 0.9), ("int4", 0.35, 0.7)])
def test_quantized_model_stays_close_to_the_float_model(moe_checkpoint, kind, tolerance, agreement):
    """Close in two senses a broken scheme fails: the logits' relative error (all-zero logits have 1, a model of
    another seed about 1.5; this int4 about 0.27, and with its weights clipped to half their range, 0.48), and
    the greedy token at most of the 32 positions (another seed's agrees at none; this int4 at 81%)."""
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
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= agreement


def stored_weights(model):
    """module name.matrix name -> (the float32 weight its stored bytes and scales represent, its scales (..., out,
    in/G) or (..., out)), for a model on the portable path (quantize's layout), read by the schemes' definitions:
    int8 q * scale; int4 two nibbles a byte, the even input high, (nibble - 8) * its group's scale."""
    out = {}
    for where, m in model.named_modules():
        if not isinstance(m, quantize.Quantized):
            continue
        for name in m.kernels:
            q, scale = getattr(m, name), getattr(m, name + "_scale").float()
            if m.bits == 8:
                out[f"{where}.{name}"] = q.float() * scale[..., None], scale
                continue
            scale = scale[..., 0].mT  # (..., in/G, out, 2) scales and zeros -> (..., out, in/G)
            nibbles = torch.stack((q >> 4, q & 15), dim=-1).flatten(-2).float() - 8  # (..., out, in)
            out[f"{where}.{name}"] = nibbles * scale.repeat_interleave(m.group_size, dim=-1), scale
    return out


def float_weights(path):
    """The float checkpoint's weights by the same names (olmoe's parameter names, which quantize's buffers keep)."""
    return {name: p.detach() for name, p in olmoe.load_model(path).named_parameters()}


@pytest.mark.parametrize("kind, group_size", [("int8", 128), ("int4", 128), ("int4", 64)])
def test_every_quantized_matrix_is_the_scheme_applied_to_its_float_weight(moe_checkpoint, kind, group_size):
    """Through the loader, every quantized matrix (each projection, each expert's gate, up and down rows, lm_head)
    holds what the scheme makes of the checkpoint's float weight, in groups of the group_size asked for."""
    weights = float_weights(moe_checkpoint)
    stored = stored_weights(portable_model(moe_checkpoint, kind, group_size=group_size))
    assert len(stored) == 2 * 6 + 1  # per layer q, k, v, o, the experts' gate_up and down; lm_head
    for name, (w, scale) in stored.items():
        f = weights[name]
        assert w.shape == f.shape, name
        torch.testing.assert_close(w, reference_dequantized(f, 8 if kind == "int8" else 4, group_size), msg=name)
        if kind == "int4":
            assert scale.shape[-1] == f.shape[-1] // group_size, name
    if group_size != 128:  # the group size mattered: the default's groups give other weights
        w, _ = stored["lm_head.weight"]
        assert not torch.allclose(w, reference_dequantized(weights["lm_head.weight"], 4, 128))


def test_clip_search_in_the_loader_rounds_every_group_no_worse_and_clips_some(moe_checkpoint):
    """load_model(clip_search=True): each int4 group of each matrix is rounded with no more squared error than
    absmax scaling gives it, and in all with less; its scales are absmax / 7 or below it (clipped), and below it
    in some groups of every matrix, where the plain load's are all absmax / 7."""
    weights = float_weights(moe_checkpoint)
    plain, clipped = (stored_weights(portable_model(moe_checkpoint, "int4", clip_search=c)) for c in (False, True))
    total = {False: 0.0, True: 0.0}
    for name in plain:
        f = weights[name]
        absmax = f.unflatten(-1, (-1, 128)).abs().amax(-1)  # (..., out, in/G)
        errors = {}
        for c, stored in ((False, plain), (True, clipped)):
            w, scale = stored[name]
            errors[c] = (w - f).unflatten(-1, (-1, 128)).square().sum(-1)  # (..., out, in/G)
            total[c] += errors[c].sum().item()
        assert (errors[True] <= errors[False] * (1 + 1e-6)).all(), name
        torch.testing.assert_close(plain[name][1], absmax / 7, msg=name)
        ratio = clipped[name][1] / (absmax / 7)
        assert (ratio <= 1 + 1e-6).all() and (ratio < 0.99).any(), name
    assert total[True] < 0.95 * total[False]


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("cpu", ["avx512", "avx2", "amx"])
def test_compiled_decoding_gives_the_same_tokens(moe_checkpoint, monkeypatch, kind, rows, cpu):
    """1 or 2 rows x K = 2 of E = 8 experts: the experts' packed weights are read inside the compiled step
    (fast.moe_pairs), one graph with no break; 5 rows: the experts loop eagerly between graphs. One row on a
    CPU without AMX also takes int8pack_mm's reduction in every int8 layer; with AMX (simulated), the packed
    kernel; on avx2, its reduction over words. Greedy tokens as eager's."""
    import generate
    from torch._dynamo.utils import counters

    monkeypatch.setattr(fast, "device_facts", lambda _: ("cpu", cpu))
    model = fast.apply(quantize.load_model(moe_checkpoint, kind))  # as generate.py runs it
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [11, 12]][:rows]  # padded: the mask path too
    torch._dynamo.reset()
    counters.clear()
    assert generate.generate(model, prompts, 6, compile=True) == generate.generate(model, prompts, 6)
    assert (sum(counters["graph_break"].values()) == 0) == (rows < 5), dict(counters["graph_break"])


@pytest.mark.parametrize("cpu, path", [("avx512", "reduction"), ("avx2", "words")])
def test_int8pack_mm_at_one_compiled_row_is_the_packed_kernels_product(monkeypatch, cpu, path):
    """The reduction a compiled step on an avx512 or avx2 CPU takes for one row (over int8 weights, or over int32
    words of four), against _weight_int8pack_mm itself, in bf16; the expert's matrix a view at an offset, as
    fast.moe_pairs reads it."""
    monkeypatch.setattr(fast, "device_facts", lambda _: ("cpu", cpu))
    assert quantize.int8_path("cpu", cpu, True, 1, 256) == path
    torch.manual_seed(0)
    q, scale = quantize.quantize(torch.randn(3, 96, 256), 8, scale_dtype=torch.bfloat16)
    q, scale = q[2], scale[2]
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    y = torch.compile(quantize.int8pack_mm, fullgraph=True)(x, q, scale, None)
    ref = torch._weight_int8pack_mm(x, q, scale)
    assert y.shape == ref.shape == (1, 96) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=1e-2, atol=1e-2 * ref.abs().max().item())


def test_int8pack_mm_casts_the_weight_from_16_rows_on(monkeypatch):
    """From INT8_CAST_ROWS rows on, a CPU of a measured class casts the weight and calls F.linear instead of
    _weight_int8pack_mm (which is made to fail here), with the packed kernel's product; below, it calls the
    kernel."""
    monkeypatch.setattr(fast, "device_facts", lambda _: ("cpu", "amx"))
    torch.manual_seed(0)
    q, scale = quantize.quantize(torch.randn(96, 256), 8, scale_dtype=torch.bfloat16)
    x = torch.randn(quantize.INT8_CAST_ROWS, 256, dtype=torch.bfloat16)
    ref = torch._weight_int8pack_mm(x, q, scale)
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: (_ for _ in ()).throw(RuntimeError("kernel")))
    y = quantize.int8pack_mm(x, q, scale, None)
    assert y.shape == ref.shape and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    with pytest.raises(RuntimeError, match="kernel"):
        quantize.int8pack_mm(x[1:], q, scale, None)


@pytest.mark.parametrize("tied", [True, False])
def test_what_is_quantized_and_what_is_not(tmp_path, tied):
    """Every linear layer and the experts are quantized; the router, a tied lm_head (the embedding), the
    embedding and the norms stay in float."""
    path = save_hf(tmp_path, tie_word_embeddings=tied)
    model = quantize.load_model(path, "int8")
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, quantize.QuantLinear)
    assert isinstance(layer.mlp.experts, quantize.QuantExperts)
    assert type(layer.mlp.gate) is torch.nn.Linear  # the router picks the experts: it stays in float
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: it is the embedding
    layers = [f"model.layers.{i}." for i in range(2)]
    quantized = {n for n, m in model.named_modules() if isinstance(m, quantize.Quantized)}
    assert quantized == {f"{layer}{name}" for layer in layers for name in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.experts")} | \
        (set() if tied else {"lm_head"})
    float_params = {n for n, _ in model.named_parameters()}  # named once: a tied lm_head is the embedding
    assert all(n == "model.embed_tokens.weight" or n.endswith(("norm.weight", "mlp.gate.weight"))
               for n in float_params), float_params


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
    """No group size of 128, 64 or 32 fits 16-wide experts: refused by default; a given group size is checked
    against every matrix, naming the first that it does not divide; 16 loads."""
    path = save_hf(tmp_path, hidden_size=32, intermediate_size=16)
    with pytest.raises(ValueError, match=r"none of the group sizes 128, 64 and 32 divides every layer's inputs"):
        quantize.load_model(path, "int4")
    with pytest.raises(ValueError, match="lm_head: 32 inputs are not a multiple of the int4 group size 128"):
        quantize.load_model(path, "int4", group_size=128)
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
    monkeypatch.setattr(fast, "device_facts", lambda device: facts)
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
    ("int4", lambda mp: mp.setattr(fast, "device_facts", lambda device: ("cuda", (8, 0)))),
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
    with pytest.raises(ValueError, match="quantize 'int3': expected 'int8', 'int8-dynamic' or 'int4'"):
        quantize.load_model(moe_checkpoint, "int3")


@pytest.mark.parametrize("in_features, tiles", [(256, 8), (128, 8), (192, 4), (64, 4), (160, 2), (96, 2), (32, 2)])
def test_tinygemm_packs_the_most_k_tiles_that_divide_the_inputs(in_features, tiles):
    """tinygemm takes 2, 4 or 8 k-tiles of 16 inputs: the most of those whose 16 * tiles divides the inputs."""
    assert quantize.tinygemm_inner_k_tiles(in_features) == tiles


@pytest.mark.parametrize("bits", [8, 4])
def test_float_shape_is_the_unpacked_weights_shape(bits):
    """The (..., out, in) of the float weight a matrix replaces, which choose_kernel's shape limits read: int8
    stores one input a byte, int4 two."""
    linear = quantize.QuantLinear(64, 256, bits, 128, torch.float32)
    experts = quantize.QuantExperts(8, 256, 128, bits, 128, torch.float32)
    assert linear.float_shape("weight") == (64, 256)
    assert experts.float_shape("gate_up_proj") == (8, 256, 256) and experts.float_shape("down_proj") == (8, 256, 128)


def test_a_raising_kernels_fallback_line_quotes_the_errors_first_line(monkeypatch, capsys):
    """The stderr line of a kernel that raised its check names the error's type and the first line of its message
    (at most 120 characters of it), so a user can tell a missing kernel from a refused shape."""
    first = "no int8 kernel on this build " + "x" * 120
    monkeypatch.setattr(torch, "_weight_int8pack_mm",
                        lambda *a: (_ for _ in ()).throw(RuntimeError(first + "\nsecond line")))
    layer = quantize.QuantLinear(64, 256, 8, 128, torch.bfloat16, "cpu")
    layer.load("weight", (), torch.randn(64, 256))
    quantize.use_kernels(torch.nn.Sequential(layer))
    err = capsys.readouterr().err
    assert f"(RuntimeError: {first[:120]}); using the portable path" in err and "second line" not in err, err
    assert layer.kernels == {"weight": "dequant"}


def test_a_wrong_kernels_reported_difference_is_its_largest_absolute_error(monkeypatch):
    """A kernel whose product is off by a known amount per output, -3 rising to 1: the check reports the largest
    |kernel - dequantized| of the probe's products, 3 (the most negative error; the largest signed one is 1)."""
    real = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda x, w, s: real(x, w, s) + torch.linspace(-3, 1, 64))
    why = quantize.check_kernel("int8pack", 8, 128, torch.float32, torch.device("cpu"))
    assert why == "its product differs from the dequantized weight's by up to 3"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_int4_group_size_is_the_largest_of_128_64_32_that_divides_every_layers_inputs(capsys):
    """OLMoE-1B-7B's layers (2048 and 1024 inputs) take 128, silently; train.py's olmoe-cpu (128 wide, experts 64
    wide) takes 64, with a note naming the inputs; 96 takes 32; inputs that none divides are refused."""
    def config(D, I, H=4):
        return olmoe.OlmoeConfig(hidden_size=D, intermediate_size=I, num_attention_heads=H)

    assert quantize.int4_group_size(config(2048, 1024, 16)) == 128 and capsys.readouterr().err == ""
    assert quantize.int4_group_size(config(128, 64)) == 64
    assert capsys.readouterr().err == ("note: int4 group size 64, the largest of 128, 64 and 32 that divides every "
                                       "layer's inputs (64, 128)\n")
    assert quantize.int4_group_size(config(96, 256)) == 32
    with pytest.raises(ValueError, match=r"none of the group sizes 128, 64 and 32 divides every layer's inputs \(40,"):
        quantize.int4_group_size(config(40, 64))


# --------------------------------------------------------------------------------------------------------------
# W8A8 (int8-dynamic): int8 activations too, on fbgemm


def w8a8_bound(x, w_hat):
    """The most a W8A8 product may differ from x @ w_hat.T when w_hat is the int8 weight the scheme stores: each
    activation rounded to half a step of its call's uint8 grid, which spans min(x, 0)..max(x, 0) in 127 steps
    (7 bits, reduce_range) or 255: |dy_o| <= step / 2 * sum_j |w_hat_oj|."""
    levels = 127 if quantize.REDUCE_RANGE else 255
    step = (x.max().clamp(min=0) - x.min().clamp(max=0)) / levels
    return step / 2 * w_hat.abs().sum(-1)  # (out,)


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_w8a8_linear_is_within_its_activations_rounding_bound(rows):
    torch.manual_seed(0)
    w, x = torch.randn(96, 256), torch.randn(rows, 256) * torch.rand(rows, 1) * 4  # rows of different ranges
    layer = quantize.QuantLinear(96, 256, 8, 128, torch.float32, "cpu", dynamic=True)
    layer.load("weight", (), w)
    layer.use("w8a8-fbgemm")
    w_hat = reference_dequantized(w, 8)
    error = (layer(x) - x @ w_hat.T).abs()
    assert (error <= w8a8_bound(x, w_hat) * 1.001 + 1e-4).all()
    assert error.max() > 1e-3  # the activations were rounded: the bound is not vacuous
    assert layer.weight.numel() == 0 and layer.handles == {"weight": min(layer.handles.values())}  # fbgemm holds it


def test_w8a8_does_not_saturate_at_full_range_activations():
    """255 x 127 + 255 x 127 overflows the int16 sum that fbgemm's AVX2 kernel (vpmaddubsw) forms from each pair of
    products; activations of 7 bits (REDUCE_RANGE, chosen where the CPU lacks AVX512-VNNI) keep it exact. With full
    8-bit activations this CPU class returned 129.5 for 256."""
    layer = quantize.QuantLinear(32, 256, 8, 128, torch.float32, "cpu", dynamic=True)
    layer.load("weight", (), torch.ones(32, 256))  # q = 127, scale 1/127
    layer.use("w8a8-fbgemm")
    torch.testing.assert_close(layer(torch.ones(2, 256)), torch.full((2, 32), 256.0), rtol=1e-3, atol=0)


@pytest.mark.parametrize("vnni, reduce_range", [(False, True), (True, False)])
def test_w8a8_keeps_7_bit_activations_exactly_where_the_cpu_lacks_vnni(vnni, reduce_range):
    assert quantize.w8a8_reduce_range(vnni) is reduce_range
    assert quantize.REDUCE_RANGE is quantize.w8a8_reduce_range(torch.cpu._is_vnni_supported())


@pytest.mark.parametrize("facts, fbgemm, kernel", [
    (("cpu", "avx512"), True, "w8a8-fbgemm"),  # x86 without AMX: AMD EPYC, Intel client
    (("cpu", "amx"), True, "w8a8-fbgemm"),  # Intel Xeon with AMX
    (("cpu", "other"), False, "int8pack"),  # an ARM CPU (Apple silicon): no fbgemm, weight-only int8
    (("cuda", (9, 0)), True, "int8-linear"),
    (("mps", None), False, "int8pack"),
])
def test_w8a8_kernel_choice_per_device(monkeypatch, facts, fbgemm, kernel):
    monkeypatch.setattr(quantize, "HAS_FBGEMM", fbgemm)
    assert quantize.choose_kernel(8, *facts, torch.bfloat16, 2048, 2048, 128, dynamic=True) == kernel
    assert quantize.choose_kernel(8, *facts, torch.bfloat16, 2048, 2048, 128) != "w8a8-fbgemm"  # int8 stays int8


def test_w8a8_experts_equal_the_oracle_with_each_calls_activations_rounded():
    """Each expert's call rounds its own tokens' activations: within the bound of that call, summed as the oracle
    sums them. A handle off by one expert would give another expert's product, far outside it."""
    torch.manual_seed(0)
    E, D, I, N, K = 8, 256, 128, 5, 3
    gate_up, down = torch.randn(E, 2 * I, D), torch.randn(E, D, I)
    experts = quantize.QuantExperts(E, D, I, 8, 128, torch.float32, "cpu", dynamic=True)
    for e in range(E):
        experts.load("gate_up_proj", (e,), gate_up[e])
        experts.load("down_proj", (e,), down[e])
    experts.use("w8a8-fbgemm")
    x = torch.randn(N, D)
    top_w, top_i = torch.randn(N, E).softmax(-1).topk(K, dim=-1)
    expected = dequantized_experts_oracle(x, top_w, top_i, reference_dequantized(gate_up, 8),
                                          reference_dequantized(down, 8))
    assert 0 < rel_error(experts(x, top_w, top_i), expected) < 0.03


def test_int8_dynamic_model_stays_close_and_drops_fbgemms_weights_with_itself(moe_checkpoint):
    ids = tokens(T=16)
    before = len(quantize.W8A8_WEIGHTS)
    with torch.no_grad():
        ref = olmoe.load_model(moe_checkpoint)(ids).logits
        model = quantize.load_model(moe_checkpoint, "int8-dynamic")
        out = model(ids).logits
    assert {k for m in model.modules() if isinstance(m, quantize.Quantized) for k in m.kernels.values()} == \
        {"w8a8-fbgemm"}
    assert 0 < rel_error(out, ref) < 0.05 and (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    assert len(quantize.W8A8_WEIGHTS) == before + 2 * (4 + 2 * 8) + 1  # per layer q, k, v, o, 2 x 8 experts; lm_head
    del model
    assert len(quantize.W8A8_WEIGHTS) == before


@pytest.mark.parametrize("rows", [1, 5])
def test_int8_dynamic_compiled_decoding_gives_the_same_tokens_without_a_graph_break(moe_checkpoint, monkeypatch,
                                                                                     rows):
    """fbgemm's packed weights cannot enter a graph; w8a8_mm, a custom op, takes their handle instead. One row: the
    experts' products too, inside the graph (fast.moe_pairs, on a measured CPU class, simulated); 5 rows: the
    experts loop eagerly, as for int8."""
    import generate
    from torch._dynamo.utils import counters

    monkeypatch.setattr(fast, "device_facts", lambda _: ("cpu", "avx512"))
    model = fast.apply(quantize.load_model(moe_checkpoint, "int8-dynamic"))
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [11, 12]][:rows]
    torch._dynamo.reset()
    counters.clear()
    assert generate.generate(model, prompts, 6, compile=True) == generate.generate(model, prompts, 6)
    assert (sum(counters["graph_break"].values()) == 0) == (rows < 5), dict(counters["graph_break"])
