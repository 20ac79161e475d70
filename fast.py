"""The fast paths: every device-specific kernel choice for olmoe.py's model, in one place.

    model = fast.apply(olmoe.load_model(path))   # generate.py and benchmark.py do this; --reference does not

olmoe.py is plain PyTorch, correct on every device, eager and compiled, and it never imports this file. apply()
changes the class of three kinds of module in place (as FSDP2's fully_shard does): the same parameters, the same
state dict, the same function, computed by the kernel that is fastest on this device for this many tokens.

    module          olmoe.py (the reference)              here, chosen from device_facts
    nn.Linear       F.linear                              linear_path: torch.mv (one bf16 row, an amx CPU) or
                                                          a reduction inductor vectorizes (one row, compiled,
                                                          an avx512 or avx2 CPU)
    Attention       SDPA                                  attention_path: a decode step written out (attend_one)
                                                          on an avx512 CPU
    Experts         moe_batched, its grouped matmul       moe_path: grouped in the graph where it is one kernel,
                    run eagerly between compiled graphs   gathered or pairs at decode sizes, dense on a GPU
                                                          without a fused grouped kernel, else the loop

quantize.py's quantized modules are swapped in by the same function, swap(), and take moe_path's choice too.
Each rule cites the PyTorch source or issue it rests on; docs/performance.md holds the measurements, and
test_fast.py checks every choice on a CPU by simulating the device. A CPU's rules are per class (cpu_class: amx,
avx512, avx2, other); a class never measured takes olmoe.py's portable kernels.
"""

import torch
import torch.nn.functional as F
from torch import nn

import olmoe

# --------------------------------------------------------------------------------------------------------------
# The facts every choice starts from


def device_facts(device):
    """(device type, capability): all the kernel choices need to know of the hardware. capability is CUDA's compute
    capability; for a CPU, its class (cpu_class). Under torch.compile, get_device_properties is folded to a constant
    (constant_fold_functions in torch/_dynamo/variables/torch.py), so asking costs nothing inside a compiled step.
    AMD GPUs (ROCm) also call themselves "cuda"; they are "rocm" here, since their capability numbers mean other
    hardware."""
    if device.type == "cuda" and torch.version.hip:
        return "rocm", None
    if device.type == "cpu":
        return "cpu", CPU_CLASS
    if device.type != "cuda":
        return device.type, None
    p = torch.cuda.get_device_properties(device)
    return "cuda", (p.major, p.minor)


def cpu_class(capability, amx):
    """A CPU's class, from the facts PyTorch itself dispatches on: ATen's vector level
    (torch.backends.cpu.get_cpu_capability(), which ATEN_CPU_CAPABILITY can lower) and AMX tiles, as inductor's
    cpu_vec_isa.py asks them (torch.cpu._is_amx_tile_supported; asked once at import, since dynamo cannot trace it).
        amx     AVX-512 and AMX: Intel Xeons since Sapphire Rapids
        avx512  AVX-512 without AMX: AMD Zen 4 and 5, Intel Xeons before Sapphire Rapids
        avx2    AVX2 without AVX-512: most laptops (Intel Core since Alder Lake, AMD Zen 2 and 3), many cloud VMs
        other   anything else: ARM (Apple Silicon), older x86
    Only the classes in MEASURED_CPUS have rules of their own (each measured there, docs/performance.md); any other
    takes the portable choice, the one olmoe.py makes, and cpu_note says so."""
    if capability == "AVX512":
        return "amx" if amx else "avx512"
    return "avx2" if capability == "AVX2" else "other"


CPU_CLASS = cpu_class(torch.backends.cpu.get_cpu_capability(), torch.cpu._is_amx_tile_supported())
MEASURED_CPUS = ("amx", "avx512", "avx2")  # the classes these rules were measured on: an Intel Xeon, an AMD EPYC,
# and the same EPYC held to its AVX2 kernels (ATEN_CPU_CAPABILITY=avx2, which inductor's cpu_vec_isa.py reads too)


def cpu_note(cls):
    """How generate.py's statistics and benchmark.py check name a CPU class, and what it runs."""
    return f"CPU class {cls}" + ("" if cls in MEASURED_CPUS else " (never measured: the portable kernels)")


def stored(x):
    """x, through a view that changes nothing, for the compiler: inductor's lowering of as_strided realizes its
    input (torch/_inductor/lowering.py), so what made x (a norm, RoPE) is computed once into a buffer, not again
    inside a reduction that reads x once for each weight row or cache slot."""
    return x.as_strided(x.shape, x.stride())


# --------------------------------------------------------------------------------------------------------------
# Linear layers


def linear_path(device_type, capability, dtype, compiling, rows):
    """Which product a linear layer takes, from device_facts. Which reads weights fastest at one row was measured on
    two classes of CPU, and they disagree:
    mv    one row in bf16 on an amx CPU: torch.mv, whose bf16 kernel sums each output's row of weights in float32
          (bf16_gemv_trans in aten/src/ATen/native/cpu/ReducedPrecisionFloatGemvFastPathKernel.cpp, which gemv in
          aten/src/ATen/native/BlasKernel.cpp takes). AMX marks that class of machine: neither product uses it at
          one row.
    gemv  one row in bf16, compiled, on an avx512 or avx2 CPU: the product as a multiply-and-sum, which inductor
          turns into one vectorized reduction (on avx2, 1.7x F.linear's speed at OLMoE's 2048 x 2048).
          quantize.int8pack_mm takes the same kind of reduction.
    mm    everything else, and every CPU class never measured: F.linear, as olmoe.py."""
    if device_type != "cpu" or dtype != torch.bfloat16 or rows != 1:
        return "mm"
    return "mv" if capability == "amx" else "gemv" if compiling and capability in ("avx512", "avx2") else "mm"


def linear(x, w):
    """x (..., in) times w (out, in) transposed, by the product linear_path picks: (..., out)."""
    rows = x.numel() // x.shape[-1]
    path = linear_path(*device_facts(x.device), x.dtype, torch.compiler.is_compiling(), rows)
    if path == "gemv":
        return gemv(x, w)
    if path == "mv":
        return mv(w, x.reshape(-1)).view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)


def gemv(x, w):
    """linear_path's gemv: x (..., in) times w (out, in) transposed as a multiply-and-sum in float32, (..., out)."""
    return (stored(x)[..., None, :].float() * w.float()).sum(-1).to(x.dtype)


@torch.library.custom_op("olmoe::mv", mutates_args=())
def mv(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """torch.mv(w, x) in x's dtype, as autocast would cast a linear layer's weight. An opaque op to inductor,
    which would otherwise decompose it into its own reduction (gemv's)."""
    return torch.mv(w.to(x.dtype), x)


@mv.register_fake
def _(w, x):
    return x.new_empty(w.shape[0])


def _mv_backward(ctx, g):
    w, x = ctx.saved_tensors
    return torch.outer(g, x), torch.mv(w.to(g.dtype).mT, g)


mv.register_autograd(_mv_backward, setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))


class Linear(nn.Linear):
    """nn.Linear (without bias, as olmoe.py's) whose product takes linear_path's kernel."""

    def forward(self, x):
        return linear(x, self.weight)


# --------------------------------------------------------------------------------------------------------------
# Attention in a decode step


def attention_path(device_type, capability):
    """How a decode step (one query per row, a mask over the cache) attends, from device_facts:
    sums  on an avx512 CPU: attend_one, which inductor fuses into reductions over the cache when compiled;
          faster, compiled and eager, than SDPA's CPU flash kernel there.
    sdpa  everywhere else: olmoe.Attention.attend (on amx it was not measured)."""
    return "sums" if device_type == "cpu" and capability == "avx512" else "sdpa"


def attend_one(q, k, v, mask):
    """attend for one query per row (T = 1), written out in float32 as SDPA's math: q (B, H, 1, Dh), k, v (B, Hkv,
    S, Dh), mask (B or 1, 1, 1, S). The H / Hkv query heads that share a key/value head are that head's rows."""
    B, H, _, Dh = q.shape
    Hkv = k.shape[1]
    q = stored(q)  # its norm and RoPE computed once, not for each cache slot
    scores = q.reshape(B, Hkv, H // Hkv, Dh).float() @ k.float().mT * Dh ** -0.5  # (B, Hkv, H/Hkv, S)
    p = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return (p @ v.float()).to(q.dtype).reshape(B, H, 1, Dh)


class Attention(olmoe.Attention):
    def attend(self, q, k, v, mask):
        if q.shape[2] == 1 and mask is not None and attention_path(*device_facts(q.device)) == "sums":
            return attend_one(q, k, v, mask)
        return super().attend(q, k, v, mask)


# --------------------------------------------------------------------------------------------------------------
# The experts


def moe_path(device_type, capability, dtype, compiling, N, K, E):
    """Which MoE kernel runs, from facts about the device, for N tokens with K of E experts each.

    grouped   olmoe.moe_batched with F.grouped_mm inside the graph. It is one kernel only on a CPU and on CUDA
              capability 9.x/10.x in bf16 (_grouped_mm_cuda in aten/src/ATen/native/cuda/Blas.cpp); on
              sm80/sm89/sm75 and MPS it falls back to offs.cpu() and a matmul per group: a host sync, which crashes
              CUDA graph capture (pytorch#169970). Its compile-time shape function takes bf16 only
              (meta_grouped_mm in torch/_meta_registrations.py), so float32 is eager-only. AMD GPUs (ROCm) do not
              fuse it either.
    gathered  few pairs (N*K < E), compiled, on a GPU: each pair's expert weights are gathered and multiplied in
              one fused kernel, so only the chosen experts are read and nothing leaves the device.
    pairs     the same few pairs, compiled, on a CPU of a measured class: a product per pair (linear's: torch.mv
              on amx, inductor's reduction on avx512 and avx2), on its expert's weights in place. It decoded faster
              than gathered on amx, and read the experts as fast or faster on avx512; on avx2, bf16 decoded 2.3x as
              fast with pairs and gemv as with grouped and F.linear. Other CPUs take grouped.
    dense     a GPU's many pairs, compiled, with no fused grouped kernel: every expert for every token, the
              unchosen ones weighted 0. It reads each expert once (at a decode batch of 64 nearly all are hit
              anyway) and needs no host sync, at E/K times the FLOPs: worth it up to DENSE_MAX_TOKENS tokens.
              A CPU, compute-bound, would pay for the FLOPs, and has no CUDA graph to break.
    loop      otherwise: olmoe.moe_batched as the reference runs it, a matmul per expert that has tokens after one
              host sync for the group bounds, outside the compiled graph (a graph break, never inside a CUDA
              graph)."""
    fused_grouped = hasattr(F, "grouped_mm") and (  # torch >= 2.10
        device_type == "cpu" and (dtype == torch.bfloat16 or dtype == torch.float32 and not compiling)
        or device_type == "cuda" and capability[0] in (9, 10) and dtype == torch.bfloat16)
    if compiling and N * K < E and (device_type != "cpu" or capability in MEASURED_CPUS):
        return "pairs" if device_type == "cpu" else "gathered"
    if fused_grouped:
        return "grouped"
    if compiling and device_type != "cpu" and N <= DENSE_MAX_TOKENS:
        return "dense"
    return "loop"


# Past this many tokens, dense's E/K-fold FLOPs outweigh its single read of the experts: at N tokens it does
# about N FLOPs per weight byte in bf16, and GPUs reach their matmul peak near 200-300 FLOPs per byte.
DENSE_MAX_TOKENS = 256


def moe_grouped(x, top_w, top_i, experts):
    """olmoe.moe_batched with its grouped matmul inside the compiled graph: one kernel, no host sync."""
    return olmoe.moe_batched(x, top_w, top_i, experts, matmul=olmoe.grouped_mm)


def moe_loop(x, top_w, top_i, experts):
    return olmoe.moe_batched(x, top_w, top_i, experts, matmul=olmoe.loop_mm)


def moe_gathered(x, top_w, top_i, experts):
    """One matrix-vector product per token-expert pair, with the pair's expert gathered. Compiled, inductor fuses
    the gather into the products (on CUDA when coordinate_descent_tuning is on, as gpt-fast's mixtral-moe sets
    it), so each chosen expert is read once; eager, the gather would copy the experts first."""
    gate, up = torch.einsum("nd,nkid->nki", x, experts.gate_up_proj[top_i]).chunk(2, dim=-1)  # (N, K, I) each
    h = torch.einsum("nki,nkdi->nkd", F.silu(gate) * up, experts.down_proj[top_i])  # (N, K, D)
    return torch.einsum("nkd,nk->nd", h, top_w)


def moe_pairs(x, top_w, top_i, experts):
    """One product per token-expert pair, by experts.mm on the expert's own weights (quantize.QuantExperts, with
    packed ones, takes this path too). The expert id is read with item(), which generate's compiled step traces as
    a symbolic integer (capture_scalar_outputs): w[e] is then a view, where a tensor index would copy the expert
    first. On a CPU reading it costs nothing; on a GPU it would be a sync inside a CUDA graph. Each token's pairs
    are summed in ascending expert order, as moe_batched sums them."""
    top_i, order = top_i.sort(dim=-1)
    top_w = top_w.gather(1, order)
    rows = []
    for n in range(top_i.shape[0]):
        y = torch.zeros_like(x[n:n + 1])  # (1, D)
        for k in range(top_i.shape[1]):
            e = top_i[n, k].item()
            torch._check(e >= 0), torch._check(e < experts.num_experts)  # so that w[e] needs no bounds guard
            gate, up = experts.mm("gate_up_proj", x[n:n + 1], e).chunk(2, dim=-1)  # (1, I) each
            y = y + experts.mm("down_proj", F.silu(gate) * up, e) * top_w[n, k]
        rows.append(y)
    return torch.cat(rows)


def moe_dense(x, top_w, top_i, experts):
    """Every expert on every token, each output weighted by the token's router weight for it (0 if unchosen)."""
    w = torch.zeros(x.shape[0], experts.num_experts, dtype=x.dtype, device=x.device).scatter(1, top_i, top_w)  # (N, E)
    gate, up = torch.einsum("nd,eid->nei", x, experts.gate_up_proj).chunk(2, dim=-1)  # (N, E, I) each
    h = torch.einsum("nei,edi->ned", F.silu(gate) * up, experts.down_proj)  # (N, E, D)
    return torch.einsum("ned,ne->nd", h, w)


MOE_PATHS = {"grouped": moe_grouped, "gathered": moe_gathered, "pairs": moe_pairs, "dense": moe_dense,
             "loop": moe_loop}


class Experts(olmoe.Experts):
    """olmoe.Experts whose batched dispatch takes moe_path's kernel; the naive one stays the specification."""

    def forward(self, x, top_w, top_i):
        if self.dispatch == "naive":
            return super().forward(x, top_w, top_i)
        N, K = top_i.shape
        path = moe_path(*device_facts(x.device), olmoe.compute_dtype(x), torch.compiler.is_compiling(), N, K,
                        self.num_experts)
        return MOE_PATHS[path](x, top_w, top_i, self)

    def mm(self, name, x, e):
        """x (n, in) times expert e's matrix `name` (gate_up_proj or down_proj), transposed, by linear: (n, out)."""
        return linear(x, getattr(self, name)[e])


# --------------------------------------------------------------------------------------------------------------
# Applying them


def swap(model, replace):
    """For every module below model, replace(qualified name, module, parent) returns the module to put in its
    place, or None to keep it. The one mechanism by which this file and quantize.py change a model."""
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            new = replace(f"{parent_name}.{name}".lstrip("."), child, parent)
            if new is not None:
                setattr(parent, name, new)
    return model


FAST = {nn.Linear: Linear, olmoe.Attention: Attention, olmoe.Experts: Experts}


def apply(model):
    """The model, its modules that have a fast path changed into it in place: their class only, so parameters,
    state dict and results stay the same. Modules quantize.py swapped in keep their own kernels. On a CPU of a class
    never measured, the portable kernels run (cpu_note says so)."""

    def faster(name, module, parent):
        if type(module) in FAST:
            module.__class__ = FAST[type(module)]
            return module
        return None

    return swap(model, faster)
