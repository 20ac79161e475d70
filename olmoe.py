"""OLMoE and OLMo2 in one file: the models, the router and its two dispatches, and a Hub checkpoint loader.

OLMoE (allenai/OLMoE-1B-7B) is a sparse mixture of experts: each of its 16 layers holds 64 small MLPs ("experts")
and a router that sends every token to 8 of them. OLMo2 is its dense sibling. Both share the same attention (with
RMSNorms on the query and key projections); they differ in where the block's norms sit and in what follows
attention: one MLP, or a routed mixture of experts.

Read top to bottom: config -> RMSNorm -> RoPE -> attention -> MLP and experts -> the router and its two dispatches
-> the two blocks -> the model and its losses -> the loader and the writer. Plain PyTorch, correct on every device:
fast.py holds the device-specific kernels and swaps them in (fast.apply).

Shape legend:
    B  batch               T  time (tokens in this call)     S  cache length (slots)
    D  hidden size         H  query heads                    Hkv  key/value heads (GQA when Hkv < H)
    Dh head dim            V  vocabulary                     L  layers
    E  experts             K  experts per token              I  expert (or MLP) width
    N  tokens = B*T        P  token-expert pairs = N*K
Parameter names are the Hub checkpoint's (q_proj, input_layernorm, mlp.gate, ...), so loading is almost an
identity map; only the experts are stacked, one (E, out, in) tensor per projection.
"""

import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

# --------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class Config:
    """Fields shared by both models. Defaults are transformers' documented ones, used for keys a config.json lacks."""

    vocab_size: int = 50304
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: as many as query heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "default", "linear" or "dynamic"
    rope_factor: float = 1.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    eos_token_id: int | list[int] | None = 50279
    pad_token_id: int | None = 1
    dtype: str = "float32"  # the dtype the checkpoint's weights are stored in: load_model's default

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                             f"{self.num_attention_heads} (or give head_dim)")
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        dtype = getattr(torch, self.dtype, None)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype {self.dtype!r} is not a floating-point torch dtype (expected e.g. bfloat16 or "
                             "float32)")
        if self.rope_type not in ("default", "linear", "dynamic"):
            raise ValueError(f"rope type {self.rope_type!r} is not supported (expected default, linear or dynamic)")


@dataclass
class Olmo2Config(Config):
    model_type = "olmo2"


@dataclass
class OlmoeConfig(Config):
    model_type = "olmoe"
    hidden_size: int = 2048
    intermediate_size: int = 2048  # width I of each expert
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    max_position_embeddings: int = 4096
    num_experts: int = 64
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = False  # renormalise the K chosen probabilities to sum to 1
    clip_qkv: float | None = None
    router_aux_loss_coef: float = 0.01
    # The OLMoE paper's router z-loss: always reported, added to .loss only when set (transformers has none).
    router_z_loss_coef: float = 0.0


def config_from_dict(d: dict) -> Config:
    """Build a config from a checkpoint's config.json, old or new rope keys alike; unknown keys are ignored."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object, got {type(d).__name__}")
    cls = {"olmo2": Olmo2Config, "olmoe": OlmoeConfig}.get(d.get("model_type"))
    if cls is None:
        raise ValueError(f"model_type {d.get('model_type')!r} is not 'olmo2' or 'olmoe'")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported (expected 'silu')")
    kw = {f.name: d[f.name] for f in fields(cls) if f.name in d and d[f.name] is not None}
    # transformers < 5 wrote rope_theta, rope_scaling={"type" or "rope_type", "factor"}; 5 writes rope_parameters.
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    kw["rope_theta"] = rope.get("rope_theta", d.get("rope_theta") or 10000.0)
    kw["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    kw["rope_factor"] = rope.get("factor", 1.0)
    kw["dtype"] = d.get("dtype") or d.get("torch_dtype") or "float32"  # transformers < 5 wrote torch_dtype
    return cls(**kw)


# The released checkpoints' real values (their config.json files), for building models without a download.
_OLMOE_1B_7B = dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                    num_attention_heads=16, max_position_embeddings=4096, num_experts=64, num_experts_per_tok=8,
                    eos_token_id=50279, pad_token_id=1, dtype="bfloat16")
_OLMO2 = dict(vocab_size=100352, max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-6,
              eos_token_id=100257, pad_token_id=100277, dtype="bfloat16")
PRESETS = {  # name -> a function returning a fresh config
    **{name: lambda: OlmoeConfig(**_OLMOE_1B_7B) for name in ("OLMoE-1B-7B-0924", "OLMoE-1B-7B-0924-Instruct",
                                                               "OLMoE-1B-7B-0125", "OLMoE-1B-7B-0125-Instruct")},
    "OLMo-2-0425-1B": lambda: Olmo2Config(**_OLMO2, hidden_size=2048, intermediate_size=8192,
                                          num_hidden_layers=16, num_attention_heads=16),
    "OLMo-2-1124-7B": lambda: Olmo2Config(**_OLMO2, hidden_size=4096, intermediate_size=11008,
                                          num_hidden_layers=32, num_attention_heads=32),
    "OLMo-2-1124-13B": lambda: Olmo2Config(**_OLMO2, hidden_size=5120, intermediate_size=13824,
                                           num_hidden_layers=40, num_attention_heads=40),
    "OLMo-2-0325-32B": lambda: Olmo2Config(**_OLMO2, hidden_size=5120, intermediate_size=27648,
                                           num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8),
}

# --------------------------------------------------------------------------------------------------------------
# RMSNorm: x / sqrt(mean(x^2) + eps) * weight, computed in float32. The two models round differently in bf16.


class OlmoeRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def normalize(self, x):
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        return self.weight * self.normalize(x).to(x.dtype)  # cast back to bf16 first, then scale


class Olmo2RMSNorm(OlmoeRMSNorm):
    def forward(self, x):
        return (self.weight * self.normalize(x)).to(x.dtype)  # scale in float32, then cast


# --------------------------------------------------------------------------------------------------------------
# RoPE, in the "rotate half" layout of HF checkpoints: dimension j pairs with j + Dh/2 (not with j + 1).


def rope_cos_sin(config: Config, position_ids, dtype):
    """cos and sin for each position, (B, T, Dh). Linear scaling divides positions by the factor; dynamic (NTK)
    scaling raises the base once the sequence outgrows max_position_embeddings, recomputed on every call."""
    Dh, theta, factor = config.head_dim, config.rope_theta, config.rope_factor
    exponents = torch.arange(0, Dh, 2, device=position_ids.device).float() / Dh  # (Dh/2,)
    if config.rope_type == "dynamic":
        seq_len = (position_ids.max() + 1).clamp(min=config.max_position_embeddings)
        scale = factor * seq_len / config.max_position_embeddings - (factor - 1)
        theta = theta * scale ** (Dh / (Dh - 2))  # a tensor: no host sync
    inv_freq = 1.0 / theta**exponents  # (Dh/2,)
    if config.rope_type == "linear":
        inv_freq = inv_freq / factor
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, Dh/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (B, T, Dh)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate each (x[j], x[j + Dh/2]) pair by its angle. x: (B, H, T, Dh); cos, sin: (B, T, Dh)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


# --------------------------------------------------------------------------------------------------------------
# Attention. Generation passes each layer a KV cache (generate.KVCache), whose update writes k, v at their slots.


class Attention(nn.Module):
    """Causal self-attention whose q and k are RMS-normalised over the whole projection (all heads at once)
    before being split into heads. Which norm, and whether q, k, v are clipped, is the caller's choice."""

    def __init__(self, config: Config, norm: type, clip_qkv: float | None):
        super().__init__()
        D, H, Hkv, Dh = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.H, self.Hkv, self.Dh, self.clip_qkv = H, Hkv, Dh, clip_qkv
        self.q_proj = nn.Linear(D, H * Dh, bias=False)
        self.k_proj = nn.Linear(D, Hkv * Dh, bias=False)
        self.v_proj = nn.Linear(D, Hkv * Dh, bias=False)
        self.o_proj = nn.Linear(H * Dh, D, bias=False)
        self.q_norm = norm(H * Dh, config.rms_norm_eps)
        self.k_norm = norm(Hkv * Dh, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask=None, cache=None, cache_pos=None):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x))  # (B, T, H*Dh)
        k = self.k_norm(self.k_proj(x))  # (B, T, Hkv*Dh)
        v = self.v_proj(x)  # (B, T, Hkv*Dh)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(B, T, self.H, self.Dh).transpose(1, 2)  # (B, H, T, Dh)
        k = k.view(B, T, self.Hkv, self.Dh).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = v.view(B, T, self.Hkv, self.Dh).transpose(1, 2)  # (B, Hkv, T, Dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k_all, v_all = cache.update(cache_pos, k, v)  # (B, Hkv, S, Dh)
            if mask is not None:  # queries that need earlier slots read the cache; a fresh prefill needs only k, v
                k, v = k_all, v_all
        y = self.attend(q, k, v, mask)  # (B, H, T, Dh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.H * self.Dh))

    def attend(self, q, k, v, mask):
        """Softmax attention of q (B, H, T, Dh) over k, v (B, Hkv, S, Dh); mask None (causal among this call's tokens)
        or (B or 1, 1, T, S), True where a query may attend. What we pass decides SDPA's kernel (aten/src/ATen/native/
        transformers/cuda/sdp_utils.cpp): flash takes no mask, so the common case passes none. A mask with enable_gqa
        falls to the math kernel, whose float32 scores grow as H*T*S (out of memory near 8-16k tokens for
        OLMo-2-32B), so then K/V are repeated to H heads; a decode step (T = 1) keeps enable_gqa: its scores are H*S."""
        H, Hkv, T = q.shape[1], k.shape[1], q.shape[2]
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv)
        if H != Hkv and T > 1:
            k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)  # (B, H, S, Dh)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != H)


# --------------------------------------------------------------------------------------------------------------
# MLP: SwiGLU, down(silu(gate(x)) * up(x)). OLMo2 has one per layer; OLMoE has E small ones, the experts.


class MLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        D, I = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(D, I, bias=False)
        self.up_proj = nn.Linear(D, I, bias=False)
        self.down_proj = nn.Linear(I, D, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """E SwiGLU MLPs stacked, each expert's gate and up projections (I, D) as one (2I, D) matrix, rows [0, I) gate
    and [I, 2I) up, so one matmul computes both. Calling it runs the chosen dispatch (below) over the experts."""

    def __init__(self, E, D, I, dispatch="batched"):
        super().__init__()
        if dispatch not in DISPATCH:
            raise ValueError(f"moe_dispatch {dispatch!r} is not one of {sorted(DISPATCH)}")
        self.num_experts, self.dispatch = E, dispatch
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * I, D) * 0.02)  # (E, 2I, D)
        self.down_proj = nn.Parameter(torch.randn(E, D, I) * 0.02)  # (E, D, I)

    def forward(self, x, top_w, top_i):
        return DISPATCH[self.dispatch](x, top_w, top_i, self)  # (N, D)


# --------------------------------------------------------------------------------------------------------------
# MoE: the router scores all E experts for each token, keeps the K best, and weights their outputs by the softmax
# probability. A dispatch then runs each token through its K experts and sums the weighted outputs.


class SparseMoE(nn.Module):
    def __init__(self, config: OlmoeConfig, dispatch: str = "batched"):
        super().__init__()
        self.K, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # the router, (E, D)
        self.experts = Experts(config.num_experts, config.hidden_size, config.intermediate_size, dispatch)

    def forward(self, x):
        B, T, D = x.shape
        x = x.view(B * T, D)  # (N, D)
        logits = self.gate(x)  # (N, E)
        # Softmax in float32: in bf16, near-equal probabilities would round together and the top-k choice
        # (and the weights) would depend on rounding rather than on the router.
        probs = logits.softmax(dim=-1, dtype=torch.float32)  # (N, E)
        top_w, top_i = probs.topk(self.K, dim=-1)  # (N, K)
        if self.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        y = self.experts(x, top_w.to(x.dtype), top_i)  # (N, D)
        return y.view(B, T, D), logits.view(B, T, -1)


# The two dispatches compute the same function with the same signature:
#   moe_naive    loops over experts, gathers the tokens routed to each, and adds their weighted outputs back: the
#                specification, but a host sync (torch.where) per expert, and matmuls as small as each one's share.
#   moe_batched  sorts the token-expert pairs by expert, so that each expert's tokens are one contiguous slice, and
#                multiplies every slice by its expert in one grouped matmul. fast.py picks other kernels per device.


def moe_naive(x, top_w, top_i, experts: Experts):
    """x: (N, D); top_w, top_i: (N, K) router weights and expert ids. Returns (N, D)."""
    y = torch.zeros_like(x)
    for e in range(experts.num_experts):
        tok, slot = torch.where(top_i == e)  # the tokens that chose e, and in which of their K slots
        if tok.numel() == 0:
            continue
        h = F.linear(x[tok], experts.gate_up_proj[e])  # (n, 2I)
        gate, up = h.chunk(2, dim=-1)
        h = F.linear(F.silu(gate) * up, experts.down_proj[e])  # (n, D)
        y.index_add_(0, tok, h * top_w[tok, slot, None])
    return y


def moe_batched(x, top_w, top_i, experts: Experts, matmul=None):
    """Same inputs and result as moe_naive. matmul: the grouped product, by default grouped_mm_eager."""
    K = top_i.shape[1]
    matmul = matmul or grouped_mm_eager
    flat = top_i.flatten()  # (P,) expert of each pair, pair p = token p // K, slot p % K
    order = flat.argsort(stable=True)  # pairs sorted by expert
    ends = torch.searchsorted(flat[order], torch.arange(1, experts.num_experts + 1, device=x.device))  # (E,)
    h = matmul(x[order // K], experts.gate_up_proj, ends)  # (P, 2I), in sorted order
    gate, up = h.chunk(2, dim=-1)
    h = matmul(F.silu(gate) * up, experts.down_proj, ends)  # (P, D)
    h = h * top_w.flatten()[order, None].to(h.dtype)  # each pair weighted by its router weight
    return torch.zeros(x.shape, dtype=h.dtype, device=x.device).index_add_(0, order // K, h)  # summed per token


def grouped_mm(x, w, ends):
    """Rows ends[e-1]:ends[e] of x (P, in) times expert e's w[e].T, with w (E, out, in): (P, out). F.grouped_mm
    (torch >= 2.10) takes 16- and 32-bit floats and rows of a multiple of 16 bytes; anything else takes the loop."""
    dtype = compute_dtype(x)
    if not hasattr(F, "grouped_mm") or dtype not in (torch.float32, torch.bfloat16, torch.float16) \
            or any(s * x.element_size() % 16 for s in (x.shape[1], w.shape[1])):
        return loop_mm(x, w, ends)
    return F.grouped_mm(x.to(dtype), w.to(dtype).transpose(-2, -1), offs=ends.int())


# F.grouped_mm is one kernel only on a CPU and CUDA 9.x/10.x in bf16 (aten/src/ATen/native/cuda/Blas.cpp); elsewhere
# it syncs with the host, crashing CUDA graph capture (pytorch#169970), and compiled it takes bf16 only
# (torch/_meta_registrations.py). So the reference runs it eagerly, between compiled graphs.
grouped_mm_eager = torch.compiler.disable(grouped_mm)


@torch.compiler.disable  # a host sync: under torch.compile, run it eagerly between graphs
def loop_mm(x, w, ends):
    """grouped_mm's result with one matmul per expert that has rows, after one host sync for the bounds."""
    ends = ends.tolist()
    return torch.cat([x[a:b] @ w[e].T for e, (a, b) in enumerate(zip([0] + ends[:-1], ends)) if b > a])


def compute_dtype(x):
    """The dtype x's matmuls run in: autocast's, when on (F.grouped_mm does not follow autocast: pytorch#174763)."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


DISPATCH = {"naive": moe_naive, "batched": moe_batched}


# --------------------------------------------------------------------------------------------------------------
# The two blocks. Read them side by side: this is where OLMo2 and OLMoE differ.


class Olmo2Block(nn.Module):
    """Post-norm: each sublayer's *output* is normalised before it joins the residual stream; the input is not."""

    def __init__(self, config: Olmo2Config, dispatch=None):
        super().__init__()
        self.self_attn = Attention(config, Olmo2RMSNorm, clip_qkv=None)
        self.post_attention_layernorm = Olmo2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.post_feedforward_layernorm = Olmo2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask=None, cache=None, cache_pos=None):
        h = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, mask, cache, cache_pos))
        return h + self.post_feedforward_layernorm(self.mlp(h)), None


class OlmoeBlock(nn.Module):
    """Pre-norm: each sublayer's *input* is normalised; its output joins the residual stream as it is."""

    def __init__(self, config: OlmoeConfig, dispatch="batched"):
        super().__init__()
        self.input_layernorm = OlmoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, OlmoeRMSNorm, clip_qkv=config.clip_qkv)
        self.post_attention_layernorm = OlmoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SparseMoE(config, dispatch)

    def forward(self, x, cos, sin, mask=None, cache=None, cache_pos=None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_pos)
        y, router_logits = self.mlp(self.post_attention_layernorm(h))
        return h + y, router_logits  # router_logits: (B, T, E)


# --------------------------------------------------------------------------------------------------------------
# The model


@dataclass
class Output:
    logits: torch.Tensor  # (B, T, V), or (B, 1, V) with last_only
    loss: torch.Tensor | None = None  # cross-entropy + router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss
    aux_loss: torch.Tensor | None = None  # load balancing (OLMoE only)
    z_loss: torch.Tensor | None = None  # router z-loss (OLMoE only)
    router_logits: tuple = ()  # per layer (B, T, E) (OLMoE only)


class Transformer(nn.Module):
    """Token embedding, L blocks, a final norm and lm_head: the whole OLMo2 or OLMoE model."""

    def __init__(self, config: Config, moe_dispatch: str = "batched"):
        super().__init__()
        self.config = config
        block, norm = (OlmoeBlock, OlmoeRMSNorm) if config.model_type == "olmoe" else (Olmo2Block, Olmo2RMSNorm)
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),  # (V, D)
            layers=nn.ModuleList(block(config, moe_dispatch) for _ in range(config.num_hidden_layers)),
            norm=norm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # (V, D)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, labels=None, *, attention_mask=None, position_ids=None, cache=None,
                cache_pos=None, last_only=False) -> Output:
        """input_ids (B, T). attention_mask (B, T), or (B, S) with a cache: 1 for real tokens, 0 for padding.
        position_ids (B, T): RoPE positions, by default the slots. cache: one per layer; cache_pos (T,): the slots
        this call's tokens take in it (None: a prefill into an empty one). labels (B, T): targets, -100 ignored."""
        B, T = input_ids.shape
        c = self.config
        fresh = cache_pos is None  # no cache, or a prefill into an empty one: the tokens see only each other
        slots = torch.arange(T, device=input_ids.device) if fresh else cache_pos  # (T,)
        if position_ids is None:
            position_ids = slots[None].expand(B, T)
        mask = None  # plain causal among this call's tokens: no mask, so attention may take its fastest kernel
        if not fresh or attention_mask is not None:
            keys = torch.arange(cache[0].k.shape[2] if cache else T, device=input_ids.device)  # (S,)
            mask = keys <= slots[:, None]  # (T, S) causal
            if attention_mask is not None:
                mask = mask & attention_mask.bool()[:, None, None, :]  # (B, 1, T, S) hide padding
            # Each query may always see its own slot, so a padding query is never left with nothing to attend to
            # (a fully masked row gives NaN, and NaN times a zero attention weight is still NaN).
            mask = mask | (keys == slots[:, None])

        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        cos, sin = rope_cos_sin(c, position_ids, x.dtype)  # (B, T, Dh)
        router_logits = []
        for i, layer in enumerate(self.model.layers):
            x, r = layer(x, cos, sin, mask, cache[i] if cache else None, slots)
            if r is not None:
                router_logits.append(r)
        x = self.model.norm(x)
        if last_only:
            x = x[:, -1:]  # prefill of a generation needs only the last position's logits
        out = Output(self.lm_head(x), router_logits=tuple(router_logits))  # (B, T, V)

        if router_logits and cache is None:  # the training-side forward; generation needs none of this
            rows, m = router_rows(router_logits, attention_mask)
            out.aux_loss, out.z_loss = load_balancing_loss(rows, m, c.num_experts_per_tok), router_z_loss(rows, m)
        if labels is not None:
            out.loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                       ignore_index=-100)
            if out.aux_loss is not None:
                out.loss = out.loss + c.router_aux_loss_coef * out.aux_loss + c.router_z_loss_coef * out.z_loss
        return out


def router_rows(router_logits, attention_mask=None):
    """All layers' router logits as (L*N, E), and each row's weight m (L*N,): 1, or 0 for padding."""
    logits = torch.cat([r.flatten(0, 1) for r in router_logits])  # (L*N, E)
    if attention_mask is None:
        return logits, torch.ones(logits.shape[0], device=logits.device)
    return logits, attention_mask.flatten().float().repeat(len(router_logits))  # (L*N,)


def load_balancing_loss(logits, m, K):
    """Switch Transformer's load-balancing loss as transformers computes it: E * sum_e f_e * p_e, f_e the share of
    tokens that chose expert e among their K (summing to K), p_e its mean router probability, over all layers'
    tokens. It is smallest when tokens spread evenly over the experts."""
    E = logits.shape[-1]
    probs = logits.softmax(dim=-1)  # (L*N, E), in the logits' dtype, as transformers does
    chosen = probs.topk(K, dim=-1).indices  # (L*N, K)
    f = torch.zeros(E, device=m.device).index_add_(0, chosen.flatten(), m.repeat_interleave(K)) / m.sum()
    p = (probs.float() * m[:, None]).sum(0) / m.sum()  # (E,)
    return E * (f * p).sum()


def router_z_loss(logits, m):
    """The OLMoE paper's router z-loss: mean over tokens of logsumexp(router logits)^2. It keeps the router's
    logits small, which keeps its softmax (and bf16 training) stable."""
    return (torch.logsumexp(logits.float(), dim=-1).square() * m).sum() / m.sum()


# --------------------------------------------------------------------------------------------------------------
# Loader: a Hub checkpoint directory (config.json + safetensors) into a Transformer


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor and what was expected."""


def read_config(path) -> Config:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: {'not a directory' if path.exists() else 'no such directory'} "
                              "(expected a checkpoint directory holding config.json and *.safetensors)")
    file = path / "config.json"
    try:
        return config_from_dict(json.loads(file.read_text()))
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    except (TypeError, ValueError) as e:  # not an object, an unsupported model, a field of the wrong kind
        raise CheckpointError(f"{file}: {e}") from None


def hub_layout(model: Transformer) -> dict:
    """Each tensor name in a Hub checkpoint -> (our parameter, index into it, the checkpoint tensor's shape).
    Only the experts differ from an identity map: expert e's gate, up and down go into slices of stacked tensors."""
    layout = {}
    for name, p in model.named_parameters():  # a tied lm_head.weight is listed once, as the embedding
        prefix = name.rpartition(".")[0]
        if name.endswith("experts.gate_up_proj"):
            I = p.shape[1] // 2
            for e in range(p.shape[0]):
                layout[f"{prefix}.{e}.gate_proj.weight"] = (name, (e, slice(0, I)))
                layout[f"{prefix}.{e}.up_proj.weight"] = (name, (e, slice(I, 2 * I)))
        elif name.endswith("experts.down_proj"):
            for e in range(p.shape[0]):
                layout[f"{prefix}.{e}.down_proj.weight"] = (name, (e,))
        else:
            layout[name] = (name, ())
    return {k: (n, i, tuple(model.get_parameter(n)[i].shape)) for k, (n, i) in layout.items()}


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid index (expected JSON with a weight_map): {e}") from None
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json "
                          "(only safetensors checkpoints are read, never pickled ones)")


def _read_tensors(file: Path, reopen_bytes=2**28):
    """Yield (name, tensor) one at a time from a safetensors file. safetensors maps the file into memory, and every
    page a read touches stays resident until the file is closed (a 2 GB file read in one opening adds 2 GB to the
    peak), so the file is closed and opened again after every reopen_bytes read."""
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            names, i = list(f.keys()), 0
        while i < len(names):
            with safe_open(file, framework="pt", device="cpu") as f:
                read = 0
                while i < len(names) and read < reopen_bytes:
                    t = f.get_tensor(names[i])
                    read, i = read + t.nbytes, i + 1
                    yield names[i - 1], t
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing (listed in the index)") from None
    except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def load_model(path, *, device=None, dtype=None, moe_dispatch="batched", prepare=None, config=None) -> Transformer:
    """Load a Hub-layout checkpoint directory (model.safetensors, or shards named by model.safetensors.index.json),
    built on the meta device, allocated once on `device` in `dtype` (default: the checkpoint's), filled one tensor at
    a time, cast as it goes: two copies never exist. prepare(model) runs on the meta model to swap modules (as
    quantize.py, variants.py do; one with load(attr, index, tensor) stores its own); config: not config.json's."""
    path = Path(path)
    config = config or read_config(path)
    dtype = dtype or getattr(torch, config.dtype)
    with torch.device("meta"):
        model = Transformer(config, moe_dispatch)
    layout = hub_layout(model)  # the checkpoint's shapes, whatever prepare does to storage below
    model.to(dtype)
    if prepare is not None:
        prepare(model)
    model.to_empty(device=device or "cpu")
    if config.tie_word_embeddings:  # to_empty gives each module its own new tensor: tie them again
        model.lm_head.weight = model.model.embed_tokens.weight

    files = _shard_files(path)
    total = sum(f.stat().st_size for f in files if f.is_file())
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading", file=sys.stderr, leave=False,
               disable=total < 2**30)  # a bar for loads of a gigabyte or more
    remaining = set(layout)
    for file in files:
        for name, t in _read_tensors(file):
            if name not in layout:
                if name == "lm_head.weight" and config.tie_word_embeddings:
                    continue  # some tied checkpoints store the shared matrix twice
                raise CheckpointError(f"{file.name}: unexpected tensor {name} {tuple(t.shape)}")
            param, index, shape = layout[name]
            if tuple(t.shape) != shape:
                raise CheckpointError(f"{file.name}: tensor {name} has shape {tuple(t.shape)}, expected {shape}")
            owner, _, attr = param.rpartition(".")
            module = model.get_submodule(owner)
            with torch.no_grad():
                if hasattr(module, "load"):
                    module.load(attr, index, t)
                else:
                    getattr(module, attr)[index].copy_(t)
            remaining.discard(name)
        bar.update(file.stat().st_size)
    bar.close()
    if remaining:
        missing = sorted(remaining)
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing, e.g. {missing[0]} "
                              f"{layout[missing[0]][2]}" + (f" and {missing[1]}" if len(missing) > 1 else ""))
    return model.eval()


def save_model(model: Transformer, path, *, shard_bytes=2**31):
    """A Hub-layout checkpoint directory that load_model and transformers' from_pretrained both read: config.json,
    the weights in the model's dtype with the experts unstacked (hub_layout read backwards), in model.safetensors or,
    past shard_bytes, shards named by model.safetensors.index.json; each file's tensors copied only while written."""
    path, c = Path(path), model.config
    path.mkdir(parents=True, exist_ok=True)
    tensors = {name: model.get_parameter(p)[i] for name, (p, i, _) in hub_layout(model).items()}  # views
    shards, size = [{}], 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > shard_bytes:
            shards, size = shards + [{}], 0
        shards[-1][name], size = t, size + t.nbytes
    n = len(shards)
    files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)] if n > 1 else ["model.safetensors"]
    for file, shard in zip(files, shards):  # clone: safetensors refuses tensors that share storage
        save_file({k: t.detach().cpu().clone() for k, t in shard.items()}, path / file, metadata={"format": "pt"})
    if n > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                 "weight_map": {k: file for file, shard in zip(files, shards) for k in shard}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    d = {k: v for k, v in vars(c).items() if not k.startswith("rope")}
    rope = dict(rope_type=c.rope_type, rope_theta=c.rope_theta)
    if c.rope_type != "default":
        rope["factor"] = c.rope_factor
    arch = {"olmoe": "OlmoeForCausalLM", "olmo2": "Olmo2ForCausalLM"}[c.model_type]  # transformers' class
    d.update(model_type=c.model_type, architectures=[arch], hidden_act="silu",
             dtype=str(model.model.embed_tokens.weight.dtype).removeprefix("torch."), rope_parameters=rope,
             rope_theta=c.rope_theta, rope_scaling=rope if c.rope_type != "default" else None)  # transformers < 5
    (path / "config.json").write_text(json.dumps(d, indent=2) + "\n")
    return path
