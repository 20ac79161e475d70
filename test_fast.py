"""Tests for fast.py: each kernel choice written out from the PyTorch facts its docstring cites, for every device class
(simulated on this CPU), and each fast path against olmoe.py's reference: the dense oracle, SDPA, F.linear, and
eager against compiled decoding."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

import fast
import generate as gen
import olmoe
from conftest import TINY, dense_oracle, gen_checkpoint, moe_layer, route


# --------------------------------------------------------------------------------------------------------------
# The experts


@pytest.mark.parametrize("N", [1, 3, 50])
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_every_moe_path_equals_the_dense_oracle(N, norm_topk_prob):
    moe = moe_layer(norm_topk_prob=norm_topk_prob)
    x = torch.randn(N, TINY["hidden_size"], dtype=torch.float64)
    expected = dense_oracle(moe, x)
    experts = fast.apply(moe).experts
    assert type(experts) is fast.Experts
    for name, path in fast.MOE_PATHS.items():
        if name == "grouped":  # the fused kernel takes float32 and bf16, not float64
            got = path(x.float(), *[t.float() if t.is_floating_point() else t for t in route(moe, x)],
                       copy.deepcopy(experts).float()).double()
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=name)
        else:
            torch.testing.assert_close(path(x, *route(moe, x), experts), expected, rtol=1e-12, atol=1e-12,
                                       msg=name)


# (device type, compute capability, dtype, compiled, N tokens) -> the MoE path, for OLMoE's K = 8 of E = 64.
# Written out from PyTorch's facts as moe_path's docstring states them, one device class at a time.
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
EXPECTED_MOE_PATH = [
    (("cpu", "avx512", BF16, False, 1), "grouped"),  # CPUs have a fused grouped_mm, bf16 and float32 eager
    (("cpu", "avx512", F32, False, 64), "grouped"),
    (("cpu", "avx512", F32, True, 1), "pairs"),  # compiled decoding: a product on each chosen expert in place
    (("cpu", "amx", F32, True, 1), "pairs"),
    (("cpu", "amx", BF16, True, 7), "pairs"),  # 56 pairs, fewer than the 64 experts
    (("cpu", "amx", BF16, True, 8), "grouped"),
    (("cpu", "avx512", F32, True, 64), "loop"),  # compiled float32: grouped_mm's shape function is bf16-only
    (("cpu", "avx512", BF16, True, 64), "grouped"),
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
    assert fast.moe_path(device_type, capability, dtype, compiled, N, 8, 64) == path


@pytest.mark.parametrize("facts, path", [
    (("cpu", "avx512"), "sums"),  # a CPU with AVX-512, without AMX: SDPA's flash kernel was 1.6-10x slower at T = 1
    (("cpu", "amx"), "sdpa"),  # not measured with AMX
    (("cuda", (9, 0)), "sdpa"),
    (("mps", None), "sdpa"),
])
def test_attention_path_is_the_right_kernel_for_each_device(facts, path):
    assert fast.attention_path(*facts) == path


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
        y = fast.attend_one(q.to(dtype), k.to(dtype), v.to(dtype), mask)
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol)


def test_amd_gpus_are_not_taken_for_nvidia_ones(monkeypatch):
    """ROCm calls its devices "cuda", and an MI300 reports capability 9.4: the probe must not read that as an H100."""
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert fast.device_facts(torch.device("cuda")) == ("rocm", None)


@pytest.mark.parametrize("device", [("cpu", "avx512"), ("cuda", (9, 0)), ("cuda", (8, 0)), ("cuda", (7, 5)),
                                    ("mps", None)])
def test_simulated_devices_run_their_path_and_agree(device, monkeypatch):
    """Pretend the CPU is another device (the probe answers for it); fast.Experts takes that device's path,
    which runs here on the CPU and gives the naive dispatch's output."""
    monkeypatch.setattr(fast, "device_facts", lambda _: device)
    taken = []
    for name, fn in list(fast.MOE_PATHS.items()):
        monkeypatch.setitem(fast.MOE_PATHS, name, lambda *a, _n=name, _f=fn: taken.append(_n) or _f(*a))
    moe = moe_layer(torch.bfloat16, hidden_size=64, intermediate_size=32, num_experts=64, num_experts_per_tok=8)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    top_w, top_i = route(moe, x)
    y = fast.apply(moe).experts(x, top_w, top_i)
    assert taken == [fast.moe_path(*device, torch.bfloat16, False, 5, 8, 64)]
    ref = olmoe.moe_naive(x.double(), top_w.double(), top_i, copy.deepcopy(moe.experts).double())
    assert (y.double() - ref).norm() / ref.norm() < 1e-2  # bf16 rounding only


@pytest.mark.parametrize("device", [("cpu", "avx512"), ("cuda", (9, 0))])
def test_mixed_precision_training_takes_the_autocast_dtypes_path(device, monkeypatch):
    """Under bf16 autocast the experts' inputs and weights are float32 (master weights, a float32 norm before
    them), but their matmuls run in bf16: the path is the one for bf16 (grouped on an H100, not float32's loop),
    and it gives the naive dispatch's output and gradients to bf16 rounding."""
    monkeypatch.setattr(fast, "device_facts", lambda _: device)
    taken = []
    for name, fn in list(fast.MOE_PATHS.items()):
        monkeypatch.setitem(fast.MOE_PATHS, name, lambda *a, _n=name, _f=fn: taken.append(_n) or _f(*a))
    moe = moe_layer(torch.float32, hidden_size=64, intermediate_size=32, num_experts=64, num_experts_per_tok=8)
    x = torch.randn(40, 64)
    top_w, top_i = (t.detach() for t in route(moe, x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fast.apply(moe).experts(x, top_w, top_i)
    assert taken == ["grouped"] and y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    grads = [p.grad.clone() for p in moe.experts.parameters()]
    ref = olmoe.moe_naive(x.double(), top_w.double(), top_i, copy.deepcopy(moe.experts).double())
    assert (y.double() - ref).norm() / ref.norm() < 1e-2
    moe.experts.zero_grad()
    olmoe.moe_naive(x, top_w, top_i, moe.experts).square().sum().backward()
    for g, p in zip(grads, moe.experts.parameters()):
        assert p.grad.dtype == torch.float32 and (g - p.grad).norm() / p.grad.norm() < 3e-2


# --------------------------------------------------------------------------------------------------------------
# Linear layers and decoding, compiled, on simulated CPUs and GPUs


@pytest.mark.parametrize("device", [("cpu", "avx512"), ("cpu", "amx"), ("cpu", "avx2"), ("cpu", "other"),
                                    ("cuda", (8, 0))])
@pytest.mark.parametrize("prompts", [[[3, 1, 4, 1, 5], [9, 2]], [[3, 1, 4], [1, 5], [9], [2, 6], [5, 3]]])
def test_compiled_decode_step_gives_the_same_tokens(tmp_path, tokenizer_json, monkeypatch, device, prompts):
    """torch.compile of the decode step (CUDA graphs on a GPU) is a fast path of the same function. With 2 rows
    of K = 2 of E = 8 experts the compiled step multiplies each pair by its expert (pairs on a CPU, gathered on a
    GPU); with 5 rows a CPU loops over the experts (a graph break), and an A100 computes them all (dense). Only the
    CPU's loop breaks the graph, which a CPU of a class never measured ("other": ARM) takes at 2 rows too (the
    portable path, in float32). Every device is simulated, this CPU too."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(fast, "device_facts", lambda _: device)
    _, path = gen_checkpoint(tmp_path, tokenizer_json)
    model = fast.apply(olmoe.load_model(path))
    torch._dynamo.reset()
    counters.clear()
    assert gen.generate(model, prompts, 10, compile=True) == gen.generate(model, prompts, 10)
    looped = device[0] == "cpu" and (len(prompts) == 5 or device[1] not in fast.MEASURED_CPUS)
    assert (sum(counters["graph_break"].values()) > 0) == looped


@pytest.mark.parametrize("model_type", ["olmoe", "olmo2"])
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("cpu", ["avx512", "avx2", "amx"])
def test_compiled_bf16_decode_step_computes_eager_logits(tmp_path, tokenizer_json, monkeypatch, model_type, rows, cpu):
    """bf16, compiled against eager, both fed the same tokens (the sampler is replaced): each step's logits within
    bf16's rounding. One row on a CPU without AMX takes fast.linear_path's "gemv" in every linear layer; with AMX
    (simulated), its "mv" (torch.mv), also in the experts, which take moe_pairs. Greedy tokens are not compared: in
    bf16 a tiny random model's top logits tie within rounding, and they part even where every kernel is the same
    (with gemv turned off, the default compiled path did so here)."""
    monkeypatch.setattr(fast, "device_facts", lambda _: ("cpu", cpu))
    _, path = gen_checkpoint(tmp_path, tokenizer_json, model_type)
    model = fast.apply(olmoe.load_model(path, dtype=torch.bfloat16))
    forced = torch.tensor([[7, 3, 9, 12, 5, 8, 2, 11, 6, 4]] * rows)

    def run(compile):
        logits = []

        def sample(x, **_):
            logits.append(x.float())
            return forced[:, len(logits) - 1].contiguous()  # as sample returns: a strided column would recompile

        monkeypatch.setattr(gen, "sample", sample)
        gen.generate(model, [[3, 1, 4, 1, 5]] * rows, forced.shape[1], compile=compile)
        return torch.stack(logits)

    eager, compiled = run(False), run(True)
    assert (compiled - eager).abs().max() <= 0.02 * eager.abs().max()


@pytest.mark.parametrize("cpu", ["avx512", "amx"])
def test_the_one_row_paths_are_the_linear_product(monkeypatch, cpu):
    """linear_path's choice, and what gemv (a CPU without AMX) and mv (with AMX) compute, compiled and eager: x @ w.T,
    against float32 F.linear, and mv's gradients against F.linear's."""
    assert fast.linear_path("cpu", "avx512", torch.bfloat16, True, 1) == "gemv"
    assert fast.linear_path("cpu", "amx", torch.bfloat16, True, 1) == fast.linear_path(
        "cpu", "amx", torch.bfloat16, False, 1) == "mv"
    for facts in [("cpu", "avx512", torch.bfloat16, False, 1), ("cpu", "avx512", torch.bfloat16, True, 2),
                  ("cpu", "avx512", torch.float32, True, 1), ("cpu", "amx", torch.bfloat16, True, 2),
                  ("cpu", "amx", torch.float32, False, 1), ("cuda", (9, 0), torch.bfloat16, True, 1),
                  ("mps", None, torch.bfloat16, True, 1)]:
        assert fast.linear_path(*facts) == "mm", facts
    torch.manual_seed(0)
    layer = fast.Linear(256, 96, bias=False).to(torch.bfloat16)
    x = torch.randn(1, 1, 256, dtype=torch.bfloat16)
    monkeypatch.setattr(fast, "device_facts", lambda _: ("cpu", cpu))
    ref = F.linear(x.float(), layer.weight.float())
    with torch.no_grad():
        compiled, code = run_and_get_code(torch.compile(layer), x)
        for y in (compiled, layer(x)):
            assert y.shape == (1, 1, 96) and y.dtype == torch.bfloat16
            torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)
    assert ("torch.ops.olmoe.mv" in code[0]) == (cpu == "amx")  # torch.mv's kernel, not inductor's reduction
    if cpu == "amx":  # mv's backward, and a float32 weight under bf16 autocast (cast as autocast casts it)
        x.requires_grad_()
        layer(x).square().sum().backward()
        gx, gw = x.grad, layer.weight.grad
        x.grad = layer.weight.grad = None
        F.linear(x, layer.weight).square().sum().backward()
        torch.testing.assert_close((gx, gw), (x.grad, layer.weight.grad), rtol=2e-2, atol=2e-2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer.float()(x)
        torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------------------------------------------
# CPU classes: a rule only where it was measured


@pytest.mark.parametrize("capability, amx, expected", [
    ("AVX512", True, "amx"),  # Intel Xeon since Sapphire Rapids
    ("AVX512", False, "avx512"),  # AMD Zen 4 / 5
    ("AVX2", False, "avx2"),  # most laptops
    ("AVX2", True, "avx2"),  # an AMX machine held to ATen's AVX2 kernels (ATEN_CPU_CAPABILITY=avx2)
    ("DEFAULT", False, "other"),  # ARM, Apple Silicon
    ("SVE256", False, "other"),
])
def test_a_cpus_class_is_atens_vector_level_and_amx(capability, amx, expected):
    assert fast.cpu_class(capability, amx) == expected


@pytest.mark.parametrize("cpu", ["other", "avx2", "amx", "avx512"])
def test_a_cpu_class_never_measured_takes_only_the_portable_choices(cpu):
    """On an "other" CPU (ARM, older x86) every choice is olmoe.py's own (F.linear, SDPA, the grouped or looped MoE
    dispatch, _weight_int8pack_mm); each measured class has at least one rule of its own, so that this test can
    fail."""
    import quantize

    grid = [(dtype, compiling, n) for dtype in (BF16, F32) for compiling in (False, True) for n in (1, 2, 7, 16, 64)]
    linear = {fast.linear_path("cpu", cpu, dtype, compiling, n) for dtype, compiling, n in grid}
    moe = {fast.moe_path("cpu", cpu, dtype, compiling, n, 8, 64) for dtype, compiling, n in grid}
    int8 = {quantize.int8_path("cpu", cpu, compiling, n, 2048) for _, compiling, n in grid}
    own = linear - {"mm"} | moe - {"grouped", "loop"} | int8 - {"int8pack"} | {fast.attention_path("cpu", cpu)} - {
        "sdpa"}
    assert (own == set()) == (cpu not in fast.MEASURED_CPUS), own


def test_an_unmeasured_cpu_class_is_named_as_running_the_portable_kernels():
    """What generate.py's statistics line and benchmark.py check say of the CPU."""
    import benchmark

    assert fast.cpu_note("avx512") == "CPU class avx512"
    assert fast.cpu_note("other") == "CPU class other (never measured: the portable kernels)"
    assert benchmark.cpu_kernels(("cpu", "other")).startswith(
        "CPU class other (never measured: the portable kernels) here; kernels, decode row / prefill: bf16 mm / mm, "
        "int8 int8pack / int8pack, ")
    assert "bf16 gemv / mm, int8 reduction / cast" in benchmark.cpu_kernels(("cpu", "avx512"))
    assert "bf16 gemv / mm, int8 words / cast" in benchmark.cpu_kernels(("cpu", "avx2"))
