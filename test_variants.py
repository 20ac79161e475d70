"""Tests for variants.py: expert choice against a loop written here and on a routing small enough to follow by hand,
the variant swapped into a model and through its checkpoint, and a train.py run of it read by evaluate.py."""

import json

import pytest
import torch
import torch.nn.functional as F

import evaluate
import olmoe
import train
import variants
from conftest import TINY_MOE, moe_layer, train_args


def expert_choice_loop(moe, x):
    """Expert choice written out: each expert in turn takes the C = round(K*N/E) tokens whose softmax probability
    for it is highest, and adds probability x expert output to each of them."""
    probs = (x @ moe.gate.weight.T).softmax(-1, dtype=torch.float32)  # (N, E)
    N, E = probs.shape
    C = round(moe.K * N / E)
    y = torch.zeros_like(x)
    for e in range(E):
        chosen = sorted(range(N), key=lambda t: -probs[t, e].item())[:C]
        for t in chosen:
            gate, up = F.linear(x[t], moe.experts.gate_up_proj[e]).chunk(2)
            y[t] += probs[t, e].to(x.dtype) * F.linear(F.silu(gate) * up, moe.experts.down_proj[e])
    return y


def as_expert_choice(moe):
    moe.__class__ = variants.ExpertChoiceMoE
    return moe


def test_expert_choice_equals_the_loop_and_gives_each_expert_its_capacity():
    """24 tokens, 8 experts, K 2: each expert takes 6 tokens, 48 token-expert pairs in all, as a token-choice
    router would have; the result is the loop's to float64's rounding."""
    moe = as_expert_choice(moe_layer())
    x = torch.randn(2, 12, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y, logits = moe(x)
    assert y.shape == x.shape and logits.shape == (2, 12, 8)
    torch.testing.assert_close(y.view(24, 32), expert_choice_loop(moe, x.view(24, 32)), rtol=1e-10, atol=1e-12)
    probs = logits.view(24, 8).softmax(-1, dtype=torch.float32)
    tok, w = moe.choose(probs)
    assert tok.shape == w.shape == (8, 6)  # capacity 2 * 24 / 8 tokens for each of the 8 experts
    for e in range(8):
        assert len(set(tok[e].tolist())) == 6  # six different tokens
        assert w[e].min() >= probs[:, e].sort(descending=True).values[5]  # the six it scores highest
        torch.testing.assert_close(w[e], probs[tok[e], e])


def test_a_token_no_expert_takes_passes_by_the_experts():
    """4 experts each strongly prefer two of 8 tokens (probability about 0.97); a ninth token scores 0.25 everywhere.
    Capacity round(1 * 9 / 4) = 2 is filled by the strong tokens, so the ninth token's MoE output is exactly 0 (the
    residual alone carries it) and each strong token gets exactly its expert's output."""
    config = olmoe.config_from_dict(dict(TINY_MOE, model_type="olmoe", hidden_size=4, num_experts=4,
                                         num_experts_per_tok=1, intermediate_size=8))
    torch.manual_seed(0)
    moe = as_expert_choice(olmoe.SparseMoE(config).double())
    with torch.no_grad():
        moe.gate.weight.copy_(torch.eye(4))  # logits = x
    x = torch.zeros(9, 4, dtype=torch.float64)
    for t in range(8):
        x[t, t // 2] = 5.0  # token t prefers expert t // 2: softmax 0.98 against 0.0066 for the others
    y, _ = moe(x[None])
    y = y[0]
    assert torch.equal(y[8], torch.zeros(4, dtype=torch.float64))
    for t in range(8):
        e, p = t // 2, x[t].softmax(-1)[t // 2]
        gate, up = F.linear(x[t], moe.experts.gate_up_proj[e]).chunk(2)
        torch.testing.assert_close(y[t], p * F.linear(F.silu(gate) * up, moe.experts.down_proj[e]))


def test_a_variant_checkpoint_round_trips_and_olmoe_refuses_it_by_name(tmp_path):
    """apply() changes only each SparseMoE's class: same state dict; saved and marked, variants.load_model gives the
    same logits and the variant's class back, while olmoe.load_model refuses the checkpoint, naming the variant."""
    config = olmoe.config_from_dict(dict(TINY_MOE, model_type="olmoe"))
    torch.manual_seed(0)
    model = olmoe.Transformer(config)
    keys = list(model.state_dict())
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    token_choice = model(ids).logits
    variants.apply(model, "expert_choice")
    assert list(model.state_dict()) == keys
    assert all(type(layer.mlp) is variants.ExpertChoiceMoE for layer in model.model.layers)
    logits = model(ids).logits
    assert not torch.allclose(logits, token_choice)  # another routing, another function
    olmoe.save_model(model, tmp_path / "ckpt")
    variants.mark(tmp_path / "ckpt", "expert_choice")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["model_type"] == "olmoe_expert_choice"
    back = variants.load_model(tmp_path / "ckpt")
    assert type(back.model.layers[0].mlp) is variants.ExpertChoiceMoE
    torch.testing.assert_close(back(ids).logits, logits)
    with pytest.raises(olmoe.CheckpointError, match="model_type 'olmoe_expert_choice' is not 'olmo2' or 'olmoe'"):
        olmoe.load_model(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="variant 'nope': expected one of expert_choice"):
        variants.apply(model, "nope")


def test_a_train_run_of_a_variant_saves_resumes_and_evaluates(train_data, tmp_path, capsys):
    """train.py --variant expert_choice: its checkpoints name the variant, --resume DIR alone continues it as the
    variant, and evaluate.py scores it."""
    out = tmp_path / "run"
    train.main(train_args(train_data, out, "--variant", "expert_choice", "--lb-coef", "0", "--steps", "2",
                          "--eval-every", "0", "--save-every", "1"))
    train.main(["--resume", str(out), "--steps", "3"])
    step = out / "step-000003"
    assert json.loads((step / "config.json").read_text())["model_type"] == "olmoe_expert_choice"
    assert type(variants.load_model(step).model.layers[0].mlp) is variants.ExpertChoiceMoE
    capsys.readouterr()
    evaluate.main(["--checkpoint", str(out), "--text", f"prose={out / 'heldout' / 'prose.txt'}"])
    assert "bits per byte" in capsys.readouterr().out


def test_the_shared_expert_equals_its_formula():
    """Shared expert, written out: the router's softmax over the first E - 1 experts, its top K of them weighted by
    their probability, plus the last expert with weight 1, for every token."""
    moe = moe_layer()  # E 8, K 2
    moe.__class__ = variants.SharedExpertMoE
    x = torch.randn(2, 12, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y, logits = moe(x)
    xs = x.view(24, 32)

    def expert(e, t):
        gate, up = F.linear(xs[t], moe.experts.gate_up_proj[e]).chunk(2)
        return F.linear(F.silu(gate) * up, moe.experts.down_proj[e])

    probs = (xs @ moe.gate.weight[:7].T).softmax(-1, dtype=torch.float32)  # (24, 7): experts 0-6 are routed
    for t in range(24):
        w, chosen = probs[t].topk(2)
        expected = sum(w[k].to(x.dtype) * expert(chosen[k].item(), t) for k in range(2)) + expert(7, t)
        # float32 softmax over 8 columns there, 7 here: probabilities a float32 rounding (1e-7) apart
        torch.testing.assert_close(y.view(24, 32)[t], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.view(24, 8)[:, :7], xs @ moe.gate.weight[:7].T)
    assert torch.isneginf(logits[..., 7]).all()  # no token is routed to the shared expert


def test_shared_expert_needs_a_choice_left():
    model = olmoe.Transformer(olmoe.config_from_dict(dict(TINY_MOE, model_type="olmoe", num_experts_per_tok=7)))
    with pytest.raises(ValueError, match="7 of 7 leaves no choice"):
        variants.apply(model, "shared_expert")


def dense_in_olmoe_layout(seed=0):
    """An OLMoE of one expert: its router's softmax is 1, so each layer's MoE is one MLP."""
    torch.manual_seed(seed)
    model = olmoe.Transformer(olmoe.config_from_dict(dict(TINY_MOE, model_type="olmoe", num_experts=1,
                                                          num_experts_per_tok=1))).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    return model


def test_an_upcycled_layer_is_its_chosen_probabilities_times_the_dense_mlp():
    """allenai/OLMoE's sparsify script: every expert a copy of the dense MLP, the router normal(0, 0.02), the rest
    copied. OLMoE does not renormalise the top-K probabilities, so each MoE layer starts as (their sum) x the dense
    MLP; with K = E the sum is 1 and the upcycled model's logits are the dense model's."""
    dense = dense_in_olmoe_layout()
    moe = variants.upcycle(dense, 8, 2, seed=3)
    assert (moe.config.num_experts, moe.config.num_experts_per_tok) == (8, 2)
    source = dict(dense.named_parameters())
    for name, p in moe.named_parameters():
        if name.endswith("mlp.gate.weight"):
            assert p.shape == (8, 32) and 0.015 < p.std().item() < 0.025  # new: normal(0, 0.02)
        elif ".experts." in name:
            assert all(torch.equal(p[e], source[name][0]) for e in range(8))
        else:
            assert torch.equal(p, source[name]), name
    h = torch.randn(2, 5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for up, down in zip(moe.model.layers, dense.model.layers):
        chosen = (h @ up.mlp.gate.weight.T).softmax(-1).topk(2).values.sum(-1, keepdim=True)  # (2, 5, 1)
        torch.testing.assert_close(up.mlp(h)[0], chosen * down.mlp(h)[0])
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(variants.upcycle(dense, 8, 8)(ids).logits, dense(ids).logits)


def test_upcycling_refuses_what_is_not_a_one_expert_olmoe():
    model = olmoe.Transformer(olmoe.config_from_dict(dict(TINY_MOE, model_type="olmoe")))
    with pytest.raises(ValueError, match="this is an OLMoE of 8 experts"):
        variants.upcycle(model, 8, 2)
    with pytest.raises(ValueError, match="expected 1 <= K <= E"):
        variants.upcycle(dense_in_olmoe_layout(), 4, 5)


def test_train_upcycles_a_dense_run_and_resumes_the_moe(train_data, tmp_path):
    """train.py --init DENSE --upcycle 4 2: the new run's step 0 is the dense run's last checkpoint upcycled (the
    experts copies of its MLP), and --resume continues the MoE rather than upcycling again."""
    (train_data / "dense.json").write_text(json.dumps(dict(json.loads((train_data / "moe.json").read_text()),
                                                           num_experts=1, num_experts_per_tok=1)))
    dense, moe = tmp_path / "dense", tmp_path / "moe"
    train.main(train_args(train_data, dense, "--steps", "2", "--eval-every", "0", "--save-every", "2",
                          model="dense.json"))
    flags = [a for a in train_args(train_data, moe, "--eval-every", "0", "--save-every", "1") if a != "--model"]
    flags.remove(str(train_data / "moe.json"))
    train.main([*flags, "--init", str(dense), "--upcycle", "4", "2", "--steps", "1"])
    train.main(["--resume", str(moe), "--steps", "2"])
    source = olmoe.load_model(dense / "step-000002")
    start = olmoe.load_model(moe / "step-000000")
    assert (start.config.num_experts, start.config.num_experts_per_tok) == (4, 2)
    expected = variants.upcycle(source, 4, 2, seed=0)
    for (name, p), q in zip(start.named_parameters(), expected.parameters()):
        assert torch.equal(p, q), name
    assert olmoe.load_model(moe / "step-000002").config.num_experts == 4
    with pytest.raises(SystemExit):
        train.main([*flags, "--upcycle", "4", "2", "--out", str(tmp_path / "no-init")])
