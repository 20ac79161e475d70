"""Weight-only int8 and int4 quantization of OLMoE and OLMo2, run on PyTorch's packed low-bit kernels.

    model = quantize.load_model("path/to/OLMoE-1B-7B-0924", "int4")   # then generate.generate(model, ...)
    python generate.py --quantize int4 --prompt ...                     # the same, from the command line

Read top to bottom: the two schemes -> which kernel runs where -> the quantized modules -> the loader.
benchmark.py measures their speed, memory and accuracy. olmoe.py knows nothing of this file: the loader's prepare
hook swaps modules on the meta device, and each quantized module stores the checkpoint tensors handed to its load().

Shape legend (as in olmoe.py): D hidden size, E experts, I expert width, N tokens, K experts per token,
G the int4 group size (inputs per scale); out and in are a weight's output and input features.
"""

import sys
import warnings
import weakref
from dataclasses import dataclass
from itertools import product
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import fast
import olmoe

# --------------------------------------------------------------------------------------------------------------
# The two schemes, both symmetric (absmax) and weight-only: activations stay in the model's dtype.
#
# int8: each output row gets one scale, absmax/127, and w ~ q * scale with q in [-127, 127].
# int4: each group of G consecutive inputs in a row gets its own scale, absmax/7; q in [-8, 7] is stored as
#       q + 8 in a nibble, two per byte, the even input in the HIGH nibble: the layout tinygemm's packer
#       (_convert_weight_to_int4pack) reads, so on a GPU the stored bytes go to it as they are.
# Scales are stored in the model's dtype, which the kernels want (_weight_int8pack_mm checks that scales and
# activations share a dtype), and weights are rounded against the stored scale: then the error stays within half
# of the step the kernels use (a bf16 scale that rounded down moves absmax at most to 127 * (1 + 2^-8) < 127.5
# steps, so rounding never needs to clip).


def quantize(w, bits, group_size=128, scale_dtype=torch.float32, clip_search=False):
    """w (..., out, in) -> (q, scale): int8 q (..., out, in) and scale (..., out); or, for int4, uint8 q
    (..., out, in/2) and scale (..., out, in/G). Scales in scale_dtype. clip_search (int4): see best_clip."""
    if bits == 4 and w.shape[-1] % group_size:
        raise ValueError(f"{w.shape[-1]} inputs are not a multiple of the int4 group size {group_size}")
    w = w.to(torch.float32, copy=True)  # our own copy, divided in place below (loading is these passes)
    tiny = torch.finfo(scale_dtype).tiny  # an all-zero row or group gets a scale that still divides
    if bits == 8:
        absmax = torch.maximum(w.amax(dim=-1), -w.amin(dim=-1))  # (..., out)
        scale = (absmax.clamp(min=tiny) / 127).to(scale_dtype)
        return w.div_(scale.float()[..., None]).round_().clamp_(-127, 127).to(torch.int8), scale
    groups = w.unflatten(-1, (-1, group_size))  # (..., out, in/G, G)
    absmax = torch.maximum(groups.amax(dim=-1), -groups.amin(dim=-1))  # (..., out, in/G)
    if clip_search:
        absmax = absmax * best_clip(groups, absmax.clamp(min=tiny))
    scale = (absmax.clamp(min=tiny) / 7).to(scale_dtype)
    q = groups.div_(scale.float()[..., None]).round_().clamp_(-8, 7).add_(8)  # (..., out, in/G, G) in [0, 15]
    q = q.to(torch.uint8).flatten(-2)  # (..., out, in)
    return q[..., 0::2] << 4 | q[..., 1::2], scale  # (..., out, in/2)


def best_clip(groups, absmax, ratios=(1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)):
    """For each group (..., out, in/G, G), the ratio r whose scale absmax * r / 7 rounds it with the least squared
    error: clipping the rare largest weights buys a finer step for all the others (AWQ's clipping search, without
    its activation statistics). Returns (..., out, in/G). Nine trial roundings: loading is that much slower."""
    best_err, best_r = None, None
    for r in ratios:
        s = (absmax * r / 7)[..., None]  # (..., out, in/G, 1)
        err = ((groups / s).round().clamp(-8, 7) * s - groups).square().sum(dim=-1)  # (..., out, in/G)
        r = torch.full_like(err, r)
        best_r = r if best_r is None else torch.where(err < best_err, r, best_r)
        best_err = err if best_err is None else torch.minimum(err, best_err)
    return best_r


def unpack_int4(q):
    """(..., out, in/2) bytes -> (..., out, in) nibbles in [0, 15], even inputs from the high nibble."""
    return torch.stack((q >> 4, q & 15), dim=-1).flatten(-2)


def dequantize(q, scale, dtype):
    """The inverse of quantize, in dtype: (..., out, in)."""
    if q.dtype == torch.uint8:  # int4: undo the +8 while still one byte per value
        q = unpack_int4(q).to(torch.int8) - 8  # (..., out, in) in [-8, 7]
        w = q.unflatten(-1, (scale.shape[-1], -1)).to(dtype) * scale[..., None].to(dtype)  # (..., out, in/G, G)
        return w.flatten(-2)
    return q.to(dtype) * scale[..., None].to(dtype)


# --------------------------------------------------------------------------------------------------------------
# Which kernel runs where
#
# A quantized weight is stored as quantize() leaves it while loading, then repacked, one matrix at a time and
# in place (the same bytes), into the layout of the kernel chosen for its device. Each kernel is a pack and a
# matmul; `scale` is (out,) for int8 and scales_and_zeros (in/G, out, 2) for int4, the kernels' own layout.


@dataclass(frozen=True)
class Kernel:
    pack: Callable | None  # (q (out, in) int8 or (out, in/2) uint8) -> the kernel's layout, same byte count
    mm: Callable  # (x (n, in), packed weight, scale, G) -> (n, out)


def tinygemm_inner_k_tiles(in_features):
    """tinygemm packs 2, 4 or 8 k-tiles of 16 inputs together; more tiles, wider loads (int4mm.cu)."""
    return next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)


def dequantized(x, w, scale, G):
    """The portable path: any device, any dtype; it materializes the float weight on every call."""
    if w.dtype == torch.uint8:
        return F.linear(x, dequantize(w, scale[..., 0].mT, x.dtype))  # scale (in/G, out, 2) -> (out, in/G)
    return F.linear(x, dequantize(w, scale, x.dtype))


def int8_linear(x, w, scale, G):
    """x (n, in) times int8 w (out, in) with one scale per output: the weight cast to x's dtype (int8 values are
    exact in bf16 and float16), F.linear, then the scale on the product."""
    return F.linear(x, w.to(x.dtype)) * scale


def int8pack_mm(x, w, scale, G):
    """x (n, in) times int8 w (out, in) with one scale per output, by int8_path's product: torch._weight_int8pack_mm,
    which converts each weight to float and scales it before its multiply-add (aten/src/ATen/native/cpu/
    int8mm_kernel.cpp); on a CPU of a measured class from INT8_CAST_ROWS rows on, the weight cast and F.linear
    (below); for one row in a compiled step (batch-1 decoding, by fast.linear_path's rule), a multiply-and-sum that
    inductor turns into one vectorized reduction, scaling each output once: over int8 weights on avx512
    (int8_reduction), over int32 words on avx2 (int8_words). Those decoded faster than _weight_int8pack_mm on their
    classes, and slower on amx (docs/performance.md#which-kernel-runs-where)."""
    path = int8_path(*fast.device_facts(x.device), torch.compiler.is_compiling(), x.shape[0], w.shape[-1])
    if path == "words":
        return int8_words(x, w, scale)
    if path == "reduction":
        return int8_reduction(x, w, scale)
    if path == "cast":
        return int8_linear(x, w, scale, G)
    return torch._weight_int8pack_mm(x, w, scale)


def int8_path(device_type, capability, compiling, rows, in_features):
    """int8pack_mm's product for `rows` rows on this device: "reduction" (one row, compiled, an avx512 CPU), "words"
    (the same on an avx2 CPU), "cast" (INT8_CAST_ROWS rows or more, a CPU of a measured class) or "int8pack", the
    portable one."""
    if device_type != "cpu" or capability not in fast.MEASURED_CPUS:
        return "int8pack"
    if rows == 1 and compiling and capability == "avx512":
        return "reduction"
    if rows == 1 and compiling and capability == "avx2" and in_features % 4 == 0:
        return "words"
    return "cast" if rows >= INT8_CAST_ROWS else "int8pack"


def int8_reduction(x, w, scale):
    """int8pack_mm's one compiled row on an avx512 CPU, (1, out), over activations made float32 and stored first
    (fast.stored): in float32, inductor's loop takes 16 lanes and loads 16 int8 weights in one 128-bit load; with
    bf16 activations it would take 32 lanes (select_tiling in torch/_inductor/codegen/cpp.py) and load int8 half a
    vector at a time through a masked load (Vectorized<int8_t>::loadu with a count, aten/src/ATen/cpu/vec/vec512/
    vec512_int.h), at half the speed."""
    return ((fast.stored(x.float())[:, None, :] * w.float()).sum(-1) * scale.float()).to(x.dtype)


def int8_words(x, w, scale):
    """int8pack_mm's one compiled row on an avx2 CPU: the reduction above, reading the weights four to an int32.
    There, inductor's loop over float32 activations takes 8 lanes, and its load of 8 int8 weights
    (Vectorized<int8_t>::loadu(ptr, 8), aten/src/ATen/cpu/vec/vec256/vec256_int.h) goes through a buffer on the
    stack, since only the 512-bit header has a fast path for a part of a vector: the reduction read 1.7 GB/s of
    weights where _weight_int8pack_mm read 12 (benchmark.py rows). Read as int32, every load is a whole vector of
    32 weights; byte j of each word is sign-extended by two shifts and meets activation 4i+j, so the activations
    are laid out as four planes (4, in/4) first. Little-endian: byte j of a word is the weight at 4i+j."""
    w32 = w.view(torch.int32)  # (out, in/4)
    planes = fast.stored(x.float().view(-1, 4).T.contiguous())  # (4, in/4): x[4i + j] at [j, i]
    t = [((w32 << (24 - 8 * j)) >> 24).float() * planes[j] for j in range(4)]
    return ((((t[0] + t[1]) + (t[2] + t[3])).sum(-1) * scale.float()).to(x.dtype))[None]  # (1, out)


# From this many rows on, on a CPU of a measured class, int8pack_mm casts the weight and calls F.linear: the CPU
# kernel _weight_int8pack_mm (cpu/int8mm_kernel.cpp) takes time in proportion to the rows, the cast and F.linear far
# less, and the cast is the faster from about 16 rows (docs/quantization.md#which-kernel-runs-where). A prefill, and
# an expert given many tokens, take the cast.
INT8_CAST_ROWS = 16


# W8A8 ("int8-dynamic"): the int8 weights above, and each call's activations quantized to 8 bits as well, so that
# the products are integer, as llama.cpp's Q8_0 does. The kernel is fbgemm's dynamic quantized linear
# (torch.ops.quantized.linear_dynamic; aten/src/ATen/native/quantized/cpu/qlinear_dynamic.cpp): it finds the
# activations' min and max over the call, quantizes them to uint8 (asymmetric, one scale per call) while packing
# them, multiplies by the int8 weight and applies the per-output weight scales in its epilogue, in float32. Its
# packed weight is a torchbind object, which a compiled graph cannot hold: the graph calls w8a8_mm, an op of our own,
# with a handle into W8A8_WEIGHTS instead, and runs it as one opaque call, with no graph break.
W8A8_WEIGHTS = {}  # handle -> fbgemm's packed (out, in) weight


def w8a8_reduce_range(vnni):
    """Whether activations keep 7 bits instead of 8. Without AVX512-VNNI, fbgemm adds pairs of uint8 x int8
    products in int16 (vpmaddubsw), which saturates at 2 x 255 x 127 > 32767; with VNNI (vpdpbusd) it adds in int32.
    torch._int_mm refuses oneDNN without VNNI for the same reason (PyTorch PR #136942)."""
    return not vnni


REDUCE_RANGE = w8a8_reduce_range(torch.cpu._is_vnni_supported())


def w8a8_pack(owner, q, scale):
    """Each (out, in) matrix of q (..., out, in) int8, with its scales (..., out), packed by fbgemm into
    W8A8_WEIGHTS under consecutive handles, in q's order; returns the first. They are dropped with owner."""
    engine, torch.backends.quantized.engine = torch.backends.quantized.engine, "fbgemm"
    try:
        with warnings.catch_warnings():
            # the quantized tensor the packer takes is deprecated (PyTorch issue #184982); the packer itself is not
            warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
            packed = [torch.ops.quantized.linear_prepack(torch._make_per_channel_quantized_tensor(
                q[i], scale[i].double(), torch.zeros(q.shape[-2], dtype=torch.long), 0), None)
                for i in product(*map(range, q.shape[:-2]))]
    finally:
        torch.backends.quantized.engine = engine
    first = max(W8A8_WEIGHTS, default=-1) + 1
    handles = range(first, first + len(packed))
    W8A8_WEIGHTS.update(zip(handles, packed))
    weakref.finalize(owner, lambda: [W8A8_WEIGHTS.pop(h) for h in handles])
    return first


# Defined with torch.library.Library, whose CPU kernel the dispatcher calls directly: torch.library.custom_op's
# Python wrapper costs a large share of a one-row expert's multiply
# (docs/quantization.md#int8-activations-too-int8-dynamic-w8a8).
_LIBRARY = torch.library.Library("olmoe_quantize", "DEF")
# SymInt: in fast.moe_pairs the handle follows from the routing, a value the compiled graph reads from a tensor
_LIBRARY.define("w8a8_mm(Tensor x, SymInt handle, SymInt out_features) -> Tensor")


def _w8a8_mm(x, handle, out_features):
    """x (n, in) times W8A8_WEIGHTS[handle] (out, in) transposed: (n, out) in x's dtype."""
    return torch.ops.quantized.linear_dynamic(x.float(), W8A8_WEIGHTS[handle], REDUCE_RANGE).to(x.dtype)


_LIBRARY.impl("w8a8_mm", _w8a8_mm, "CPU")
torch.library.register_fake("olmoe_quantize::w8a8_mm", lambda x, handle, out_features: x.new_empty(
    x.shape[0], out_features))
w8a8_mm = torch.ops.olmoe_quantize.w8a8_mm


KERNELS = {
    "int8pack": Kernel(None, int8pack_mm),
    # One scale per output: scale the product instead of the weight. Compiled, inductor fuses the int8->float
    # conversion into the matmul's load (gpt-fast's int8 path, with coordinate_descent_tuning).
    "int8-linear": Kernel(None, int8_linear),
    "int4pack-cpu": Kernel(lambda q: torch._convert_weight_to_int4pack_for_cpu(unpack_int4(q).int(), 1),
                           lambda x, w, sz, G: torch._weight_int4pack_mm_for_cpu(x, w, G, sz)),
    "tinygemm": Kernel(lambda q: torch._convert_weight_to_int4pack(q, tinygemm_inner_k_tiles(2 * q.shape[-1])),
                       lambda x, w, sz, G: torch._weight_int4pack_mm(x, w, G, sz)),
    "dequant": Kernel(None, dequantized),
    "w8a8-fbgemm": Kernel(None, None),  # packed into W8A8_WEIGHTS by Quantized.use, multiplied by Quantized.mm
}
HAS_FBGEMM = "fbgemm" in torch.backends.quantized.supported_engines  # x86 builds of PyTorch


def choose_kernel(bits, device_type, capability, dtype, out_features, in_features, group_size, dynamic=False):
    """The fastest kernel PyTorch has for a quantized (out, in) weight on this device, or "dequant". dynamic: int8
    activations too (W8A8), where a kernel for it exists; elsewhere the weight-only int8 kernel.

    int8pack      CPU and MPS: torch._weight_int8pack_mm(x, w int8 (out, in), scales (out,) in x's dtype).
                  CPU: aten/src/ATen/native/LinearAlgebra.cpp and cpu/int8mm_kernel.cpp; MPS:
                  aten/src/ATen/native/mps/operations/Quantized.mm, which also wants out and in multiples of 32.
                  On an avx512 CPU, one row in a compiled step takes a reduction instead, and on a measured CPU
                  class 16 rows or more the weight cast to x's dtype and F.linear (int8_path).
    int8-linear   CUDA: F.linear(x, w.to(x.dtype)) * scale, whose int8->float cast inductor fuses into the matmul
                  (gpt-fast's int8 path). CUDA's own _weight_int8pack_mm, where a build has it
                  (aten/src/ATen/native/cuda/int8mm.cu), is a plain float32 loop, one thread per output.
    int4pack-cpu  CPU: torch._weight_int4pack_mm_for_cpu, weights packed by _convert_weight_to_int4pack_for_cpu
                  from int32 nibbles (out, in); it wants out % 16 == 0 and G in {32, 64, 128, 256}
                  (LinearAlgebra.cpp, cpu/int4mm_kernel.cpp).
    tinygemm      CUDA sm80+ (it uses Ampere's m16n8k16 bf16 tensor-core MMA) and MPS: torch._weight_int4pack_mm
                  with _convert_weight_to_int4pack(uint8 (out, in/2), inner_k_tiles) and scales_and_zeros
                  (in/G, out, 2), dequantizing (q - 8) * scale + zero. CUDA takes bf16 activations only, in a
                  multiple of 16 * inner_k_tiles, out a multiple of 8 (aten/src/ATen/native/cuda/int4mm.cu);
                  MPS takes bf16, fp16 or fp32 (mps/operations/Quantized.mm).
    w8a8-fbgemm   W8A8 on a CPU with fbgemm (x86 builds): w8a8_mm, fbgemm's dynamic quantized linear. PyTorch's
                  other integer matmul, torch._int_mm, runs a scalar loop on CPUs without AVX512-VNNI
                  (_int_mm_out_cpu in LinearAlgebra.cpp), far slower than float32 F.linear.
    dequant       everything else (older GPUs, other group sizes, odd shapes): dequantize, then F.linear.
    A kernel that cannot run here is checked at load time on a probe (check_kernel) before it is trusted."""
    group_ok = group_size in (32, 64, 128, 256)
    if bits == 8 and dynamic and device_type == "cpu" and HAS_FBGEMM:
        return "w8a8-fbgemm"
    if bits == 8:
        if device_type == "cpu" or (device_type == "mps" and out_features % 32 == 0 and in_features % 32 == 0):
            return "int8pack"
        return "int8-linear" if device_type == "cuda" else "dequant"
    if device_type == "cpu" and group_ok and out_features % 16 == 0:
        return "int4pack-cpu"
    tinygemm_ok = group_ok and out_features % 8 == 0 and in_features % 32 == 0
    if device_type == "cuda" and capability >= (8, 0) and dtype == torch.bfloat16 and tinygemm_ok:
        return "tinygemm"
    if device_type == "mps" and tinygemm_ok:
        return "tinygemm"
    return "dequant"


def check_kernel(kernel, bits, group_size, dtype, device):
    """None if `kernel` multiplies a small random probe as the dequantized weight does, else why not."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(64, 256, generator=g), torch.randn(3, 256, generator=g)  # shapes every kernel accepts
    layer = QuantLinear(64, 256, bits, group_size, dtype, device)
    layer.load("weight", (), w)
    x = x.to(device, dtype)
    with torch.no_grad():
        ref = layer(x).float()  # still the portable path: nothing is packed yet
        try:
            layer.use(kernel)
            y = layer(x).float()
        except Exception as e:  # a kernel missing from this build, or refusing this device or shape
            return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2  # bf16 / fp16 products round to ~3 digits
    if kernel == "w8a8-fbgemm":  # activations rounded to 1/127 of their range, 256 products a sum: ~1%
        tolerance = 5e-2
    if y.shape != ref.shape or not torch.allclose(y, ref, rtol=tolerance, atol=tolerance * ref.abs().max().item()):
        return f"its product differs from the dequantized weight's by up to {(y - ref).abs().max().item():.3g}"
    return None


# --------------------------------------------------------------------------------------------------------------
# Quantized modules. Each holds matrices `name` (quantized) beside `name_scale`; the loader fills them through
# load(), then use(kernel) repacks each matrix for its kernel. Until then forward runs the portable path.


class Quantized(nn.Module):
    def __init__(self, shapes: dict, bits, group_size, dtype, device, where="", clip_search=False, dynamic=False):
        """shapes: name -> (..., out, in), the float weights these replace. where: the module's name, for errors.
        dynamic: int8 activations too (W8A8), where the device has a kernel for it."""
        super().__init__()
        self.bits, self.group_size, self.dtype, self.clip_search = bits, group_size, dtype, clip_search
        self.dynamic, self.handles = dynamic, {}  # handles: name -> its first in W8A8_WEIGHTS, once packed there
        self.kernels = {name: "dequant" for name in shapes}
        for name, shape in shapes.items():
            *lead, out_features, in_features = shape
            if bits == 4 and in_features % group_size:
                raise ValueError(f"{where}: {in_features} inputs are not a multiple of the int4 group size "
                                 f"{group_size}")
            if bits == 8:
                q = torch.empty(*lead, out_features, in_features, dtype=torch.int8, device=device)
                scale = torch.empty(*lead, out_features, dtype=dtype, device=device)
            else:
                q = torch.empty(*lead, out_features, in_features // 2, dtype=torch.uint8, device=device)
                scale = torch.empty(*lead, in_features // group_size, out_features, 2, dtype=dtype, device=device)
            self.register_buffer(name, q)  # (..., out, in) int8 or (..., out, in/2) uint8
            self.register_buffer(name + "_scale", scale)  # (..., out) or (..., in/G, out, 2)

    def load(self, name, index, w):
        """Quantize checkpoint tensor w (rows, in) into matrix `name` at index: () for a whole matrix, (e,) for
        expert e, (e, rows) for a slice of its rows."""
        q, scale = quantize(w.to(getattr(self, name).device), self.bits, self.group_size, self.dtype,
                            self.clip_search)
        getattr(self, name)[index] = q
        if self.bits == 8:
            getattr(self, name + "_scale")[index] = scale
        else:  # int4 scales are (..., in/G, out, 2): the rows index moves one place right; zeros stay 0
            sz_index = index[:1] + (slice(None),) + index[1:] if len(index) > 1 else index
            getattr(self, name + "_scale")[sz_index] = torch.stack((scale.mT, torch.zeros_like(scale.mT)), dim=-1)

    def choose(self, device_type, capability):
        """name -> the kernel choose_kernel picks for each matrix."""
        return {name: choose_kernel(self.bits, device_type, capability, self.dtype, *self.float_shape(name)[-2:],
                                    self.group_size, self.dynamic) for name in self.kernels}

    def float_shape(self, name):
        q = getattr(self, name)
        return (*q.shape[:-1], q.shape[-1] * 2) if self.bits == 4 else tuple(q.shape)

    def use(self, kernel, names=None):
        """Repack matrices (all, or `names`) for `kernel`, one (out, in) matrix at a time, in place: the packed
        layout has as many bytes as the stored one, so no second copy of a layer ever exists."""
        for name in names or list(self.kernels):
            assert self.kernels[name] == "dequant", "repacking a packed weight"
            pack, q = KERNELS[kernel].pack, getattr(self, name)
            self.kernels[name] = kernel
            if kernel == "w8a8-fbgemm":  # fbgemm keeps its own copy: this one goes
                self.handles[name] = w8a8_pack(self, q, getattr(self, name + "_scale"))
                setattr(self, name, q.new_empty(*q.shape[:-1], 0))
            if pack is None:
                continue
            raw = q.view(torch.uint8)
            for i in product(*map(range, q.shape[:-2])):  # () for a single matrix, (e,) for each expert
                p = pack(q[i])
                raw[i].view(-1).copy_(p.view(torch.uint8).view(-1))
            setattr(self, name, raw.view(p.dtype).view(*q.shape[:-2], *p.shape))

    def mm(self, name, x, i=()):
        """x (n, in) times matrix `name` (expert i, if stacked), transposed: (n, out)."""
        if name in self.handles:  # the expert's handle follows the first: w8a8_pack packs them in order
            return w8a8_mm(x, self.handles[name] + (0 if i == () else i), getattr(self, name + "_scale").shape[-1])
        return KERNELS[self.kernels[name]].mm(x, getattr(self, name)[i], getattr(self, name + "_scale")[i],
                                              self.group_size)


class QuantLinear(Quantized):
    """nn.Linear(in, out, bias=False) with a quantized weight."""

    def __init__(self, out_features, in_features, bits, group_size, dtype, device="meta", **kw):
        super().__init__({"weight": (out_features, in_features)}, bits, group_size, dtype, device, **kw)

    def forward(self, x):
        y = self.mm("weight", x.reshape(-1, x.shape[-1]).contiguous())  # (N, out); the kernels need rows packed
        return y.view(*x.shape[:-1], -1)


class QuantExperts(Quantized):
    """olmoe.Experts with quantized stacked weights, gate_up_proj (E, 2I, D) and down_proj (E, D, I). Its forward
    loops over the experts that have tokens and runs each one's own packed weights; compiled on a CPU at decode
    sizes, fast.moe_pairs does the same per pair inside the graph. No expert is ever dequantized (the grouped
    and gathered dispatches need float weights for all E experts or a gathered copy)."""

    def __init__(self, E, D, I, bits, group_size, dtype, device="meta", **kw):
        super().__init__({"gate_up_proj": (E, 2 * I, D), "down_proj": (E, D, I)}, bits, group_size, dtype, device,
                         **kw)
        self.num_experts = E

    def forward(self, x, top_w, top_i):
        """x (N, D); top_w, top_i (N, K): router weights and expert ids. Returns (N, D), as olmoe.moe_naive does."""
        N, K = top_i.shape
        path = fast.moe_path(*fast.device_facts(x.device), x.dtype, torch.compiler.is_compiling(), N, K,
                              self.num_experts)
        if path == "pairs":  # a CPU at decode sizes, compiled: in the graph, each pair's packed expert read in place
            return fast.moe_pairs(x, top_w, top_i, self)
        return self.looped(x, top_w, top_i)

    # A host sync and a loop whose trip count depends on the routing: under torch.compile, run it eagerly between
    # the graphs, as olmoe's loop_mm does, instead of re-tracing it for every pattern of counts.
    @torch.compiler.disable
    def looped(self, x, top_w, top_i):
        K = top_i.shape[1]
        flat = top_i.flatten()  # (P,) expert of each pair, pair p = token p // K, slot p % K
        order = flat.argsort(stable=True)  # pairs sorted by expert: each expert's pairs are one slice
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # the one host sync
        w = top_w.flatten()  # (P,)
        y = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            pairs = order[start:start + n]  # (n,)
            start += n
            tok = pairs // K
            h = self.mm("gate_up_proj", x[tok], e)  # (n, 2I)
            gate, up = h.chunk(2, dim=-1)
            h = self.mm("down_proj", F.silu(gate) * up, e)  # (n, D)
            y.index_add_(0, tok, h * w[pairs, None])
        return y


def int4_group_size(config):
    """The largest of 128, 64 and 32 that divides the inputs of every matrix of the model (hidden_size for q, k, v,
    the MLP's or experts' gate and up, and lm_head; intermediate_size for down; the heads' width for o): int4 scales
    whole groups, and a small model's experts may be 64 wide. A one-line note when it is not 128."""
    inputs = sorted({config.hidden_size, config.intermediate_size, config.num_attention_heads * config.head_dim})
    for group_size in (128, 64, 32):
        if all(n % group_size == 0 for n in inputs):
            if group_size < 128:
                print(f"note: int4 group size {group_size}, the largest of 128, 64 and 32 that divides every layer's "
                      f"inputs ({', '.join(map(str, inputs))})", file=sys.stderr)
            return group_size
    raise ValueError(f"int4: none of the group sizes 128, 64 and 32 divides every layer's inputs "
                     f"({', '.join(map(str, inputs))})")


def swap_in_quantized(model, bits, group_size=None, clip_search=False, dynamic=False):
    """The prepare hook: on the meta device, replace every nn.Linear and every olmoe.Experts by a quantized one
    (fast.swap, the mechanism fast.apply uses too), except the router (mlp.gate: E x D, tiny, and it picks the
    experts) and a tied lm_head (it is the embedding). group_size None: int4_group_size's choice."""
    dtype = model.model.embed_tokens.weight.dtype  # the model's dtype (prepare runs after model.to(dtype))
    if group_size is None:
        group_size = int4_group_size(model.config) if bits == 4 else 128  # int8 has one scale per row: no groups

    def quantized(where, child, parent):
        if isinstance(child, olmoe.Experts):
            E, I2, D = child.gate_up_proj.shape
            return QuantExperts(E, D, I2 // 2, bits, group_size, dtype, where=where, clip_search=clip_search,
                                dynamic=dynamic)
        if isinstance(child, nn.Linear) and not (isinstance(parent, olmoe.SparseMoE) and child is parent.gate) \
                and child.weight is not model.model.embed_tokens.weight:
            return QuantLinear(child.out_features, child.in_features, bits, group_size, dtype, where=where,
                               clip_search=clip_search, dynamic=dynamic)
        return None

    fast.swap(model, quantized)


def use_kernels(model):
    """Give each quantized matrix its device's kernel, checking each kernel once on a probe first; a kernel
    that fails its check is replaced by the portable path, with one line on stderr."""
    modules = [m for m in model.modules() if isinstance(m, Quantized)]
    if not modules:
        return
    device = next(modules[0].buffers()).device
    facts, verdicts = fast.device_facts(device), {"dequant": "dequant"}
    for m in modules:
        for name, kernel in m.choose(*facts).items():
            if kernel not in verdicts:
                why = check_kernel(kernel, m.bits, m.group_size, m.dtype, device)
                if why is not None:
                    print(f"quantize: kernel {kernel} failed its check on {device} ({why}); using the portable "
                          "path (dequantize, then F.linear)", file=sys.stderr)
                verdicts[kernel] = kernel if why is None else "dequant"
            m.use(verdicts[kernel], [name])


# --------------------------------------------------------------------------------------------------------------
# Loader


def load_model(path, kind, *, device=None, dtype=None, group_size=None, moe_dispatch="batched",
               clip_search=False):
    """olmoe.load_model, with every linear layer and expert quantized to `kind` ("int8", "int8-dynamic" or "int4",
    group_size inputs per int4 scale; None: the largest of 128, 64, 32 that fits the model) as its tensors are read:
    the float model is never allocated. Then the weights are repacked for the device's kernels, one matrix at a time.
    int8-dynamic is int8 with activations quantized too (W8A8), on devices with a kernel for it; elsewhere int8.
    clip_search (int4): choose each group's scale by best_clip, a lower error for a slower load. moe_dispatch matters
    only to an unquantized model's experts."""
    bits = {"int8": 8, "int8-dynamic": 8, "int4": 4}.get(kind)
    if bits is None:
        raise ValueError(f"quantize {kind!r}: expected 'int8', 'int8-dynamic' or 'int4'")
    dynamic = kind == "int8-dynamic"
    model = olmoe.load_model(path, device=device, dtype=dtype, moe_dispatch=moe_dispatch,
                             prepare=lambda m: swap_in_quantized(m, bits, group_size, clip_search, dynamic))
    with torch.no_grad():
        use_kernels(model)
    if dynamic and not any(m.handles for m in model.modules() if isinstance(m, Quantized)):
        print(f"quantize: no int8 activation kernel on {next(model.parameters()).device} (fbgemm, x86 CPUs only); "
              "int8-dynamic runs as weight-only int8", file=sys.stderr)
    return model
