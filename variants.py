"""Architectures the OLMoE paper tried and no released checkpoint has, swapped into an olmoe.Transformer, and
sparse upcycling of a dense model into an MoE.

    model = olmoe.Transformer(config); variants.apply(model, "shared_expert")  # train.py --variant; or expert_choice
    model = variants.load_model("runs/exp/.../step-000300")                    # a variant's checkpoint, or any other
    moe = variants.upcycle(dense, 8, 1)                                         # train.py --init DENSE --upcycle 8 1

olmoe.py keeps the released architectures and knows nothing of this file: apply() changes the class of each
olmoe.SparseMoE in place (fast.swap, the mechanism fast.py and quantize.py use), so parameters and checkpoint tensors
stay the same, and a variant's checkpoint differs only in config.json's model_type, "olmoe_<variant>", which
olmoe.load_model and transformers refuse by that name instead of running the checkpoint as the released routing.
"""

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import fast
import olmoe

PREFIX = "olmoe_"  # a variant's config.json model_type: olmoe_<variant>


class ExpertChoiceMoE(olmoe.SparseMoE):
    """Expert choice (Zhou et al. 2022; compared in the OLMoE paper's section 4): each expert takes the C = K·N/E
    tokens of the batch whose router probability for it is highest, so every expert gets exactly C tokens and none
    is dropped for balance; a token gets K experts on average, anywhere from none (the residual alone carries it) to
    E. The scores are each token's softmax over the experts, as in token choice. A token's experts depend on the
    other tokens of the batch, later ones included: fine for training and scoring a batch, a leak for generation."""

    def choose(self, probs):
        """Router probabilities (N, E) -> the tokens each expert takes and their probabilities, (E, C) each."""
        N, E = probs.shape
        C = min(N, max(1, round(self.K * N / E)))  # each expert's capacity
        w, tok = probs.topk(C, dim=0)  # (C, E): each expert's C best tokens
        return tok.T, w.T

    def forward(self, x):
        B, T, D = x.shape
        x = x.view(B * T, D)  # (N, D)
        logits = self.gate(x)  # (N, E)
        tok, w = self.choose(logits.softmax(dim=-1, dtype=torch.float32))  # (E, C) each
        h = torch.bmm(x[tok], self.experts.gate_up_proj.transpose(1, 2))  # (E, C, 2I)
        gate, up = h.chunk(2, dim=-1)
        h = torch.bmm(F.silu(gate) * up, self.experts.down_proj.transpose(1, 2))  # (E, C, D)
        y = torch.zeros_like(x).index_add_(0, tok.flatten(), (h * w[..., None].to(x.dtype)).flatten(0, 1))
        return y.view(B, T, D), logits.view(B, T, -1)


class SharedExpertMoE(olmoe.SparseMoE):
    """A shared expert (DeepSeekMoE; the OLMoE paper's section 4 found it no better): the last of the E experts
    takes every token with weight 1, and the router picks K of the other E - 1, so K + 1 experts are active. The
    released tensor layout is kept; the router's logit for the shared expert is -inf (its row of the router is
    unused), so every routing statistic sees an expert no token is routed to, and the load-balancing loss, over E
    columns, is E / (E - 1) rather than 1 at perfect balance. Against 64 experts choosing 8: 64 choosing 7 + 1."""

    def forward(self, x):
        B, T, D = x.shape
        x = x.view(B * T, D)  # (N, D)
        logits = self.gate(x)  # (N, E)
        logits = torch.cat([logits[:, :-1], torch.full_like(logits[:, -1:], float("-inf"))], dim=-1)
        top_w, top_i = logits.softmax(dim=-1, dtype=torch.float32).topk(self.K, dim=-1)  # (N, K)
        if self.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        shared = self.experts.num_experts - 1  # one more choice for every token: the shared expert, weight 1
        top_w = torch.cat([top_w, torch.ones_like(top_w[:, :1])], dim=-1)  # (N, K + 1)
        top_i = torch.cat([top_i, torch.full_like(top_i[:, :1], shared)], dim=-1)
        y = self.experts(x, top_w.to(x.dtype), top_i)  # (N, D)
        return y.view(B, T, D), logits.view(B, T, -1)


VARIANTS = {"expert_choice": ExpertChoiceMoE, "shared_expert": SharedExpertMoE}


def apply(model, name):
    """The model with every olmoe.SparseMoE turned into the variant `name`, in place; returns the model."""
    if name not in VARIANTS:
        raise ValueError(f"variant {name!r}: expected one of {', '.join(VARIANTS)}")
    if model.config.model_type != "olmoe":
        raise ValueError(f"variant {name!r} changes an OLMoE's experts; this is a {model.config.model_type} model")
    if name == "shared_expert" and model.config.num_experts_per_tok >= model.config.num_experts - 1:
        raise ValueError(f"variant 'shared_expert' routes num_experts_per_tok of num_experts - 1 experts: "
                         f"{model.config.num_experts_per_tok} of {model.config.num_experts - 1} leaves no choice")

    def variant(_, module, parent):
        if type(module) is olmoe.SparseMoE:
            module.__class__ = VARIANTS[name]
            return module
        return None

    return fast.swap(model, variant)


def read_config(path):
    """A checkpoint's config and its variant's name (None for a released architecture)."""
    file = Path(path) / "config.json"
    try:
        d = json.loads(file.read_text())
    except (OSError, ValueError):  # missing or not JSON: olmoe.read_config says so, naming the file
        d = {}
    model_type = d.get("model_type", "") if isinstance(d, dict) else ""
    if not model_type.startswith(PREFIX):
        return olmoe.read_config(path), None  # its errors, for a missing or malformed config too
    name = model_type.removeprefix(PREFIX)
    if name not in VARIANTS:
        raise olmoe.CheckpointError(f"{file}: model_type {model_type!r}: no variant {name!r} in variants.py "
                                    f"(expected one of {', '.join(VARIANTS)})")
    return olmoe.config_from_dict(dict(d, model_type="olmoe")), name


def load_model(path, **kw):
    """olmoe.load_model, for a variant's checkpoint too: the variant is applied before the weights are read."""
    config, name = read_config(path)
    prepare = kw.pop("prepare", None)

    def prepare_variant(model):
        if name:
            apply(model, name)
        if prepare:
            prepare(model)

    return olmoe.load_model(path, config=config, prepare=prepare_variant, **kw)


def mark(path, name):
    """After olmoe.save_model(model, path): config.json names the variant, so that only this file loads it."""
    file = Path(path) / "config.json"
    file.write_text(json.dumps(dict(json.loads(file.read_text()), model_type=PREFIX + name), indent=2) + "\n")


# --------------------------------------------------------------------------------------------------------------
# Sparse upcycling (Komatsuzaki et al. 2023; the OLMoE paper's section 4, with allenai/OLMoE's
# scripts/sparsify_ckpt_unsharded.py): a trained dense model becomes an MoE whose every expert is a copy of its MLP,
# and whose router is new, normal(0, 0.02). The dense model here is an OLMoE of one expert (its router's softmax is
# always 1, so it is an OLMoE-layout dense model: OLMo2's norms sit elsewhere and would not carry over).


def upcycle_config(config, num_experts, num_experts_per_tok):
    """The upcycled model's config: the dense one's (an OLMoE of one expert) with E experts, K per token."""
    if config.model_type != "olmoe" or config.num_experts != 1:
        raise ValueError("upcycling copies an OLMoE of one expert (a dense model in OLMoE's layout); this is " + (
            f"an OLMoE of {config.num_experts} experts" if config.model_type == "olmoe" else config.model_type))
    if not 1 <= num_experts_per_tok <= num_experts:
        raise ValueError(f"upcycling to {num_experts} experts, {num_experts_per_tok} per token: expected 1 <= K <= E")
    return dataclasses.replace(config, num_experts=num_experts, num_experts_per_tok=num_experts_per_tok)


def upcycle(dense, num_experts, num_experts_per_tok, seed=0):
    """A new OLMoE of num_experts copies of each layer's MLP in `dense` (an OLMoE of one expert), K of them per
    token; every other weight copied. Its MoE layers compute (sum of the K chosen probabilities) x the dense MLP."""
    config = upcycle_config(dense.config, num_experts, num_experts_per_tok)
    moe = olmoe.Transformer(config).to(next(dense.parameters()).dtype)
    source = dict(dense.named_parameters())
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if name.endswith("mlp.gate.weight"):  # the router: new
                torch.nn.init.normal_(p, std=0.02)
            else:  # the experts: (1, ...) copied E times; everything else as it is
                p.copy_(source[name].expand_as(p))
    return moe
