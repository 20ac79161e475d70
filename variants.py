"""Architectures the OLMoE paper tried and no released checkpoint has, swapped into an olmoe.Transformer.

    model = olmoe.Transformer(config); variants.apply(model, "expert_choice")    # then train it (train.py --variant)
    model = variants.load_model("runs/exp/.../step-000300")                    # a variant's checkpoint, or any other

olmoe.py keeps the released architectures and knows nothing of this file: apply() changes the class of each
olmoe.SparseMoE in place (fast.swap, the mechanism fast.py and quantize.py use), so parameters and checkpoint tensors
stay the same, and a variant's checkpoint differs only in config.json's model_type, "olmoe_<variant>", which
olmoe.load_model and transformers refuse by that name instead of running the checkpoint as the released routing.
"""

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


VARIANTS = {"expert_choice": ExpertChoiceMoE}


def apply(model, name):
    """The model with every olmoe.SparseMoE turned into the variant `name`, in place; returns the model."""
    if name not in VARIANTS:
        raise ValueError(f"variant {name!r}: expected one of {', '.join(VARIANTS)}")
    if model.config.model_type != "olmoe":
        raise ValueError(f"variant {name!r} changes an OLMoE's experts; this is a {model.config.model_type} model")

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
