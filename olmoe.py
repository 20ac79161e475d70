"""OLMoE and OLMo2 in one file: the models, the router and its two dispatches, and a Hub checkpoint loader.

OLMoE (allenai/OLMoE-1B-7B) is a sparse mixture of experts: each of its 16 layers holds 64 small MLPs
("experts") and a router that sends every token to 8 of them. OLMo2 is its dense sibling. Both share the
same attention (with RMSNorms on the query and key projections); they differ in where the block's norms sit
and in what follows attention: one MLP, or a routed mixture of experts.

Read top to bottom: config -> RMSNorm -> RoPE -> attention (with its KV cache) -> MLP -> MoE router and the
two dispatches -> the two blocks -> the model -> quantization (skippable) -> the loader.

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
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

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

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
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
    # The OLMoE paper also trains with a router z-loss (coefficient 0.001). transformers has none, so it is
    # reported always but added to the loss only when this is set, which keeps .loss equal to transformers'.
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
    # transformers < 5 wrote rope_theta and rope_scaling={"type" or "rope_type": ..., "factor": ...};
    # transformers 5 writes rope_parameters={"rope_type": ..., "rope_theta": ..., "factor": ...}.
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    kw["rope_theta"] = rope.get("rope_theta", d.get("rope_theta") or 10000.0)
    kw["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    kw["rope_factor"] = rope.get("factor", 1.0)
    return cls(**kw)


# The released checkpoints' real values (their config.json files), for building models without a download.
_OLMOE_1B_7B = dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                    num_attention_heads=16, max_position_embeddings=4096, num_experts=64, num_experts_per_tok=8,
                    eos_token_id=50279, pad_token_id=1)
_OLMO2 = dict(vocab_size=100352, max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-6,
              eos_token_id=100257, pad_token_id=100277)
PRESETS = {  # name -> a function returning a fresh config
    "OLMoE-1B-7B-0924": lambda: OlmoeConfig(**_OLMOE_1B_7B),
    "OLMoE-1B-7B-0924-Instruct": lambda: OlmoeConfig(**_OLMOE_1B_7B),
    "OLMoE-1B-7B-0125": lambda: OlmoeConfig(**_OLMOE_1B_7B),
    "OLMoE-1B-7B-0125-Instruct": lambda: OlmoeConfig(**_OLMOE_1B_7B),
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
# Attention, with a KV cache for generation


class KVCache(nn.Module):
    """Keys and values of one layer for S slots, allocated once. Generation writes each new token's k, v at its
    slot and attends over all S slots, with a mask hiding slots not yet written (and left padding)."""

    def __init__(self, B, Hkv, S, Dh, *, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(B, Hkv, S, Dh, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros(B, Hkv, S, Dh, dtype=dtype, device=device))

    def update(self, cache_pos, k, v):
        self.k[:, :, cache_pos] = k  # k: (B, Hkv, T, Dh) written at slots cache_pos (T,)
        self.v[:, :, cache_pos] = v
        return self.k, self.v  # (B, Hkv, S, Dh)


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
            k, v = cache.update(cache_pos, k, v)  # (B, Hkv, S, Dh)
        # mask is (B or 1, 1, T, S) with True where a query may attend; None means plain causal, no cache.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.H != self.Hkv)  # (B, H, T, Dh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.H * self.Dh))


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
    """E SwiGLU MLPs stacked. Each expert's gate and up projections (I, D) in the checkpoint are stored as one
    (2I, D) matrix, rows [0, I) gate and [I, 2I) up, so one matmul computes both."""

    def __init__(self, E, D, I):
        super().__init__()
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * I, D) * 0.02)  # (E, 2I, D)
        self.down_proj = nn.Parameter(torch.randn(E, D, I) * 0.02)  # (E, D, I)

    # The dispatches read weights through these two, which quantized experts override to dequantize.
    def gate_up(self, i=slice(None)):
        return take(self.gate_up_proj, i)  # (..., 2I, D): expert i, or one per element of an index tensor i

    def down(self, i=slice(None)):
        return take(self.down_proj, i)  # (..., D, I)


def take(t, i):
    """t[i] for an int, a slice or an index tensor (index_select: several times faster than t[i] on a CPU)."""
    if isinstance(i, torch.Tensor):
        return t.index_select(0, i.flatten()).unflatten(0, i.shape)
    return t[i]


# --------------------------------------------------------------------------------------------------------------
# MoE: the router and the two dispatches
#
# The router scores all E experts for each token, keeps the K best, and weights their outputs by the softmax
# probability. A dispatch then runs each token through its K experts and sums the weighted outputs. The two
# dispatches below compute the same function with the same signature:
#   moe_naive    loops over experts, gathers the tokens routed to each, and adds their weighted outputs back.
#                It is the specification: easy to check against the paper, but it does Python work and a host
#                sync (torch.where) per expert, and its matmuls are as small as each expert's share of tokens.
#   moe_batched  sorts the N*K token-expert pairs by expert, so each expert's tokens are one contiguous slice,
#                and runs all experts in one grouped matmul (no Python per expert, no host sync). For a few
#                tokens under torch.compile it instead gathers just the chosen experts (moe_gathered).


def moe_naive(x, top_w, top_i, experts: Experts):
    """x: (N, D); top_w, top_i: (N, K) router weights and expert ids. Returns (N, D)."""
    y = torch.zeros_like(x)
    for e in range(experts.num_experts):
        tok, slot = torch.where(top_i == e)  # the tokens that chose e, and in which of their K slots
        if tok.numel() == 0:
            continue
        h = F.linear(x[tok], experts.gate_up(e))  # (n, 2I)
        gate, up = h.chunk(2, dim=-1)
        h = F.linear(F.silu(gate) * up, experts.down(e))  # (n, D)
        y.index_add_(0, tok, h * top_w[tok, slot, None])
    return y


def moe_batched(x, top_w, top_i, experts: Experts):
    """Same inputs and result as moe_naive."""
    N, K = top_i.shape
    E = experts.num_experts
    # Few tokens: gather their experts when compiled, or when the experts are quantized (the grouped matmul
    # would first dequantize all E of them).
    if N * K < E and (torch.compiler.is_compiling() or isinstance(experts, QuantExperts)):
        return moe_gathered(x, top_w, top_i, experts)
    flat = top_i.flatten()  # (P,) expert of each pair, pair p = token p // K, slot p % K
    order = flat.argsort(stable=True)  # pairs sorted by expert
    ends = torch.searchsorted(flat[order], torch.arange(1, E + 1, device=x.device))  # (E,) end of each group
    h = grouped_mm(x[order // K], experts.gate_up(), ends)  # (P, 2I), in sorted order
    gate, up = h.chunk(2, dim=-1)
    h = grouped_mm(F.silu(gate) * up, experts.down(), ends)  # (P, D)
    h = torch.empty_like(h).index_copy_(0, order, h)  # back to pair order
    return torch.einsum("nkd,nk->nd", h.view(N, K, -1), top_w)


def moe_gathered(x, top_w, top_i, experts: Experts):
    """moe_batched's path for a few tokens: one matrix-vector product per token-expert pair, with the pair's
    expert gathered. Compiled, inductor can fuse the gather into the products, so each chosen expert is read
    once; eager, the gather is a copy of the experts, and the grouped path, which reads them in place, is
    faster."""
    gate, up = torch.einsum("nd,nkid->nki", x, experts.gate_up(top_i)).chunk(2, dim=-1)  # (N, K, I) each
    h = torch.einsum("nki,nkdi->nkd", F.silu(gate) * up, experts.down(top_i))  # (N, K, D)
    return torch.einsum("nkd,nk->nd", h, top_w)


def grouped_mm(x, w, ends):
    """Rows ends[e-1]:ends[e] of x (P, in) times expert e's w[e].T, with w (E, out, in). Returns (P, out)."""
    kernel = getattr(F, "grouped_mm", None)  # torch >= 2.10: CPUs, and GPUs from the A100 on
    aligned = all(s * x.element_size() % 16 == 0 for s in (x.shape[1], w.shape[1]))
    # it takes bf16 everywhere, float32 only in eager mode on a CPU
    dtype_ok = x.dtype == torch.bfloat16 or (x.dtype == torch.float32 and not x.is_cuda
                                              and not torch.compiler.is_compiling())
    if kernel is not None and aligned and dtype_ok:
        return kernel(x, w.transpose(-2, -1), offs=ends.int())  # one kernel for all groups
    # Portable fallback (float64, old torch): one matmul per expert that has rows; one host sync for the bounds.
    ends = ends.tolist()
    return torch.cat([x[a:b] @ w[e].T for e, (a, b) in enumerate(zip([0] + ends[:-1], ends)) if b > a])


DISPATCH = {"naive": moe_naive, "batched": moe_batched}


class SparseMoE(nn.Module):
    def __init__(self, config: OlmoeConfig, dispatch: str = "batched"):
        super().__init__()
        if dispatch not in DISPATCH:
            raise ValueError(f"moe_dispatch {dispatch!r} is not one of {sorted(DISPATCH)}")
        self.K, self.norm_topk_prob, self.dispatch = config.num_experts_per_tok, config.norm_topk_prob, dispatch
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # the router
        self.experts = Experts(config.num_experts, config.hidden_size, config.intermediate_size)

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
        y = DISPATCH[self.dispatch](x, top_w.to(x.dtype), top_i, self.experts)
        return y.view(B, T, D), logits.view(B, T, -1)


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

    def new_cache(self, B, S, *, dtype=None, device=None):
        """One KVCache per layer for B rows of S slots."""
        c, p = self.config, self.model.embed_tokens.weight  # never quantized
        return [KVCache(B, c.num_key_value_heads, S, c.head_dim, dtype=dtype or p.dtype, device=device or p.device)
                for _ in range(c.num_hidden_layers)]

    def forward(self, input_ids, labels=None, *, attention_mask=None, position_ids=None, cache=None,
                cache_pos=None, last_only=False) -> Output:
        """input_ids (B, T). attention_mask (B, T), or (B, S) with a cache: 1 for real tokens, 0 for padding.
        position_ids (B, T): RoPE positions, by default counted from cache_pos[0]. cache: from new_cache;
        cache_pos (T,): the slots this call's tokens take in it. labels (B, T): next-token targets, -100 ignored."""
        B, T = input_ids.shape
        c = self.config
        if cache is not None and cache_pos is None:
            raise ValueError("a cache needs cache_pos, the slots of this call's tokens")
        slots = cache_pos if cache is not None else torch.arange(T, device=input_ids.device)  # (T,)
        if position_ids is None:
            position_ids = slots[None].expand(B, T)
        mask = None  # plain causal
        if cache is not None or attention_mask is not None:
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
            x, r = layer(x, cos, sin, mask, cache[i] if cache else None, cache_pos)
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
    """Switch Transformer's load-balancing loss as transformers computes it: E * sum_e f_e * p_e, where f_e is
    the share of tokens that chose expert e among their K (summing to K) and p_e its mean router probability,
    both over all layers' tokens. It is smallest when tokens spread evenly over the experts."""
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
# Quantization (weight-only; skip it on a first reading)
#
# int8: each output row of a weight matrix gets one scale, absmax/127, and w ~ q * scale with q in [-127, 127].
# int4: each group of G consecutive inputs in a row gets its own scale, absmax/7; q in [-8, 7] is stored as
#       q + 8 in a nibble, two per byte. Smaller groups follow the weights more closely but store more scales.
# Every linear layer and every expert is quantized, except the router (E x D, tiny, and it picks the experts)
# and a tied lm_head (it is the embedding). Activations, norms and the embedding stay in the model's dtype.


def quantize(w, bits, group_size=128):
    """w (..., out, in) -> (q, scale): int8 q (..., out, in) and scale (..., out); or, for int4, uint8 q
    (..., out, in/2) and scale (..., out, in/G). Scales are kept in float32."""
    w = w.float()
    if bits == 4 and w.shape[-1] % group_size:
        raise ValueError(f"{w.shape[-1]} inputs are not a multiple of the int4 group size {group_size}")
    if bits == 8:
        scale = w.abs().amax(dim=-1).clamp(min=1e-12) / 127  # (..., out)
        return (w / scale[..., None]).round().clamp(-127, 127).to(torch.int8), scale
    groups = w.unflatten(-1, (-1, group_size))  # (..., out, in/G, G)
    scale = groups.abs().amax(dim=-1).clamp(min=1e-12) / 7  # (..., out, in/G)
    q = ((groups / scale[..., None]).round().clamp(-8, 7) + 8).to(torch.uint8).flatten(-2)  # (..., out, in)
    return q[..., 0::2] | (q[..., 1::2] << 4), scale  # even inputs in the low nibble, odd in the high


def unpack_int4(q):
    """(..., out, in/2) bytes -> (..., out, in) nibbles in [0, 15], even inputs from the low nibble."""
    return torch.stack((q & 15, q >> 4), dim=-1).flatten(-2)


def dequantize(q, scale, dtype):
    """The inverse of quantize, in dtype: (..., out, in)."""
    if q.dtype == torch.uint8:  # int4: undo the +8 while still one byte per value
        q = unpack_int4(q).to(torch.int8) - 8  # (..., out, in) in [-8, 7]
        w = q.unflatten(-1, (scale.shape[-1], -1)).to(dtype) * scale[..., None].to(dtype)  # (..., out, in/G, G)
        return w.flatten(-2)
    return q.to(dtype) * scale[..., None].to(dtype)


class Quantized(nn.Module):
    """Holds quantized tensors, each `name` beside its `name_scale`; the loader fills them through load()."""

    def __init__(self, like: dict, bits, group_size):
        super().__init__()
        self.bits, self.group_size = bits, group_size
        for name, t in like.items():  # the float tensors these replace (on the meta device, when loading)
            q, scale = quantize(torch.empty(t.shape, device="meta"), bits, group_size)
            self.register_buffer(name, torch.empty_like(q, device=t.device))  # (..., out, in) int8 or (..., in/2) uint8
            self.register_buffer(name + "_scale", torch.empty_like(scale, device=t.device))  # (..., out) or (..., in/G)

    def load(self, name, index, w):
        q, scale = quantize(w.to(getattr(self, name).device), self.bits, self.group_size)
        getattr(self, name)[index], getattr(self, name + "_scale")[index] = q, scale


class QuantLinear(Quantized):
    """nn.Linear(in, out, bias=False) with a quantized weight. On a CPU it uses PyTorch's int8 and int4 kernels,
    for which int4 weights are repacked into the kernel's layout as they are loaded."""

    def __init__(self, linear: nn.Linear, bits, group_size):
        super().__init__({"weight": linear.weight}, bits, group_size)
        self.cpu_int4 = False  # set once the weight is in the CPU kernel's layout

    def load(self, name, index, w):
        super().load(name, index, w)
        if self.bits == 4 and self.weight.is_cpu and hasattr(torch, "_weight_int4pack_mm_for_cpu") and \
                self.group_size in (32, 64, 128, 256) and self.weight.shape[0] % 16 == 0:  # what it supports
            self.weight.copy_(torch._convert_weight_to_int4pack_for_cpu(unpack_int4(self.weight).int(), 1))
            self.cpu_int4 = True

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        if self.cpu_int4:
            if not x.is_cpu:
                raise RuntimeError("int4 weights were packed for the CPU: load the model on the device it runs on")
            scale = self.weight_scale.T.to(x.dtype)  # (in/G, out); the kernel computes (q - 8) * scale + zero
            y = torch._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size,
                                                 torch.stack((scale, torch.zeros_like(scale)), dim=-1))
        elif self.bits == 8 and x.is_cpu and hasattr(torch, "_weight_int8pack_mm"):
            y = torch._weight_int8pack_mm(x2, self.weight, self.weight_scale.to(x.dtype))
        elif self.bits == 8:  # one scale per output: scale the product instead of dequantizing the weight
            y = F.linear(x2, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)
        else:
            y = F.linear(x2, dequantize(self.weight, self.weight_scale, x.dtype))
        return y.view(*x.shape[:-1], -1)


class QuantExperts(Quantized):
    """Experts with quantized stacked weights; the dispatches dequantize only the experts they read."""

    def __init__(self, experts: Experts, bits, group_size, dtype):
        super().__init__({name: getattr(experts, name) for name in ("gate_up_proj", "down_proj")}, bits, group_size)
        self.num_experts, self.dtype = experts.num_experts, dtype  # dtype: what the dispatches compute in

    def gate_up(self, i=slice(None)):
        return dequantize(take(self.gate_up_proj, i), take(self.gate_up_proj_scale, i), self.dtype)  # (..., 2I, D)

    def down(self, i=slice(None)):
        return dequantize(take(self.down_proj, i), take(self.down_proj_scale, i), self.dtype)  # (..., D, I)


def quantize_model(model: Transformer, kind: str, group_size=128, dtype=torch.float32):
    """Swap (on the meta device, before loading) every linear layer and every Experts for a quantized one."""
    bits = {"int8": 8, "int4": 4}.get(kind)
    if bits is None:
        raise ValueError(f"quantize {kind!r}: expected 'int8' or 'int4'")
    for parent_name, parent in list(model.named_modules()):
        for name, child in parent.named_children():
            try:
                if isinstance(child, Experts):
                    setattr(parent, name, QuantExperts(child, bits, group_size, dtype))
                elif isinstance(child, nn.Linear) and name != "gate" and \
                        child.weight is not model.model.embed_tokens.weight:
                    setattr(parent, name, QuantLinear(child, bits, group_size))
            except ValueError as e:
                raise ValueError(f"{parent_name}.{name}".lstrip(".") + f": {e}") from None


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


def _read_tensors(file: Path):
    """Yield (name, tensor) one at a time from a safetensors file, so only one tensor is in memory at once."""
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing (listed in the index)") from None
    except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def load_model(path, *, device=None, dtype=None, moe_dispatch="batched", quantize=None,
               group_size=128) -> Transformer:
    """Load a Hub-layout checkpoint directory (one model.safetensors, or shards named by
    model.safetensors.index.json). The model is built on the meta device (no memory), allocated once on
    `device` in `dtype` (default float32), and filled one checkpoint tensor at a time, cast as it goes, so two
    copies of the weights never exist. quantize: None, "int8" or "int4" (with group_size inputs per scale):
    then each tensor is quantized as it is read, and no full-precision model is ever built."""
    path = Path(path)
    config = read_config(path)
    dtype = dtype or torch.float32
    with torch.device("meta"):
        model = Transformer(config, moe_dispatch)
    layout = hub_layout(model)  # full-precision shapes, whatever quantization does to storage below
    model.to(dtype)
    if quantize is not None:
        quantize_model(model, quantize, group_size, dtype)  # after .to(dtype): scales stay float32
    model.to_empty(device=device or "cpu")
    if config.tie_word_embeddings:  # to_empty gives each module its own new tensor: tie them again
        model.lm_head.weight = model.model.embed_tokens.weight

    remaining = set(layout)
    for file in _shard_files(path):
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
                    module.load(attr, index, t)  # quantized module: quantizes as it stores
                else:
                    getattr(module, attr)[index].copy_(t)
            remaining.discard(name)
    if remaining:
        missing = sorted(remaining)
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing, e.g. {missing[0]} "
                              f"{layout[missing[0]][2]}" + (f" and {missing[1]}" if len(missing) > 1 else ""))
    return model.eval()
