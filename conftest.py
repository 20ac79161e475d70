"""Shared fixtures for the tests: tiny configs, random transformers models saved in the Hub's layout (transformers is
the reference the tests compare against), and a byte-level BPE tokenizer trained here. Nothing is downloaded."""

import json
import os
import random

import pytest
import torch
import transformers

import olmoe
import text
from safetensors.torch import load_file, save_file

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, eos_token_id=None, bos_token_id=None, pad_token_id=None)
TINY_MOE = dict(TINY, num_experts=8, num_experts_per_tok=2)


HF_CLASSES = {"olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM),
              "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM)}


def hf_model(model_type, seed=0, **overrides):
    """A random transformers model of a tiny config, its norms perturbed so that their weights matter."""
    cls = HF_CLASSES[model_type]
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


def copy_checkpoint(src, dst, edit_tensors=None, edit_config=None):
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(edit_config(cfg) if edit_config else cfg))
    tensors = load_file(src / "model.safetensors")
    save_file(edit_tensors(tensors) if edit_tensors else tensors, dst / "model.safetensors")
    return dst


TOKENIZER_VOCAB, MODEL_VOCAB = 300, 320  # the model's vocabulary is padded, as the released ones are


@pytest.fixture(scope="session")
def tokenizer_json(tmp_path_factory):
    """A byte-level BPE tokenizer trained here (text.train_tokenizer, as train.py's), so multi-byte characters span
    several tokens."""
    docs = ["the quick brown fox jumps over the lazy dog; café, naïve, 日本語"] * 20
    tok = text.train_tokenizer(docs, TOKENIZER_VOCAB, special_tokens=[text.EOS])
    assert tok.get_vocab_size() == TOKENIZER_VOCAB
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tok.save(str(path))
    return path


def gen_checkpoint(path, tokenizer_json, model_type="olmoe", **overrides):
    ref = hf_model(model_type, vocab_size=MODEL_VOCAB, max_position_embeddings=128, **overrides)
    save(ref, path)
    (path / "tokenizer.json").write_text(tokenizer_json.read_text())
    return ref, path


# --------------------------------------------------------------------------------------------------------------
# One MoE layer, its router and a dense oracle, for the dispatch tests of test_olmoe.py and test_fast.py


def moe_layer(dtype=torch.float64, **overrides):
    config = olmoe.config_from_dict({**TINY_MOE, **overrides, "model_type": "olmoe"})
    torch.manual_seed(0)
    moe = olmoe.SparseMoE(config).to(dtype)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return moe


def route(moe, x):
    """The router as SparseMoE specifies it: float32 softmax, top K, optionally renormalised. (N, K) each."""
    top_w, top_i = (x @ moe.gate.weight.T).softmax(-1, dtype=torch.float32).topk(moe.K, dim=-1)
    if moe.norm_topk_prob:
        top_w = top_w / top_w.sum(-1, keepdim=True)
    return top_w.to(x.dtype), top_i


def dense_oracle(moe, x):
    """Every expert on every token, weighted by the router probability where the expert is in the top k, else 0."""
    top_w, top_i = route(moe, x)
    weight = torch.zeros(x.shape[0], moe.experts.num_experts, dtype=x.dtype).scatter(1, top_i, top_w)  # (N, E)
    gate, up = torch.einsum("nd,eid->nei", x, moe.experts.gate_up_proj).chunk(2, dim=-1)
    out = torch.einsum("nei,edi->ned", torch.nn.functional.silu(gate) * up, moe.experts.down_proj)  # (N, E, D)
    return torch.einsum("ned,ne->nd", out, weight)


def megablocks_loss(router_logits, K):
    """megablocks' batched_load_balancing_loss (the Muennighoff/megablocks fork OLMoE trained with), written as it
    computes it: tokens_per_expert and the mean expert scores of all layers concatenated, one dot product, scaled
    by E / (L * T * K)."""
    scores = [r.flatten(0, 1).softmax(dim=-1) for r in router_logits]  # L x (tokens, E)
    L, (T, E) = len(scores), scores[0].shape
    tokens_per_expert = torch.cat([torch.bincount(s.topk(K, dim=-1).indices.flatten(), minlength=E)
                                   for s in scores]).float()  # (L*E,)
    expert_scores = torch.cat(scores, dim=1).mean(dim=0)  # (L*E,)
    return E / (L * T * K) * torch.dot(tokens_per_expert, expert_scores)


# --------------------------------------------------------------------------------------------------------------
# One tiny training run that the tests of train.py, routing.py, evaluate.py and generate.py share

TRAIN_MOE = dict(model_type="olmoe", hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                 num_experts=8, num_experts_per_tok=2, max_position_embeddings=128)
TRAIN_OLMO2 = dict(model_type="olmo2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=128)


@pytest.fixture(scope="session")
def train_data(tmp_path_factory):
    """Two domains of made-up text with structure a tiny model learns in a few steps, and tiny model configs."""
    d = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    words = "the a cat dog bird sees likes chases runs home tree river over under and then".split()
    (d / "prose.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + "."
                                           for _ in range(1500)))
    code = d / "code"
    code.mkdir()
    for i in range(6):  # a glob of several files: whole files are held out
        (code / f"m{i}.py").write_text("\n".join(f"def f_{rng.randint(0, 99)}(x):\n    return x * "
                                                 f"{rng.randint(0, 9)} + {rng.randint(0, 9)}\n" for _ in range(200)))
    for name, config in [("moe.json", TRAIN_MOE), ("olmo2.json", TRAIN_OLMO2)]:
        (d / name).write_text(json.dumps(config))
    return d


def train_args(data, out, *extra, model="moe.json"):
    """train.py's flags for a tiny run: batch 4 x 32 tokens, a BPE vocabulary of 300."""
    return ["--text", f"prose={data / 'prose.txt'}", "--text", f"code={data / 'code' / '*.py'}", "--out", str(out),
            "--model", str(data / model), "--vocab-size", "300", "--batch-size", "4", "--seq-len", "32",
            "--eval-tokens", "512", "--lr", "1e-2", "--warmup-steps", "2", *extra]


@pytest.fixture(scope="session")
def short_run(train_data, tmp_path_factory):
    """A tiny OLMoE trained by train.py for 30 steps, evaluated and saved every 15: the run directory, with its
    log.jsonl, held-out text and checkpoints step-000000 (untrained, its weights alone), step-000015 and
    step-000030 (both resumable). Tests read it and never write into it."""
    import train

    out = tmp_path_factory.mktemp("short")
    train.main(train_args(train_data, out, "--steps", "30", "--eval-every", "15", "--save-every", "15",
                          "--keep-resumable", "2"))
    return out


# --------------------------------------------------------------------------------------------------------------
# Optional packages


IN_CI = os.environ.get("CI") == "true"  # .ci/run: the optional packages are installed on purpose


def importorskip(name):
    """pytest.importorskip, except in CI (CI=true), which installs the optional packages on purpose: there a
    missing one fails the test instead of hiding it as a skip."""
    if IN_CI:
        import importlib

        return importlib.import_module(name)
    return pytest.importorskip(name)
