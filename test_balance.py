"""Tests of balance.py: the load-balancing loss in each convention, by hand and against megablocks' and
transformers' code, and the expert counts train.py and routing.py share."""

import pytest
import torch

import balance
import olmoe
from conftest import megablocks_loss


def balanced_router_logits(L=2, N=16, E=8, K=2):
    """Router logits whose every expert gets exactly N*K/E of the token-expert pairs and whose mean probability is
    1/E: token t prefers experts t, t+1, ..., t+K-1 (mod E) equally, so the picture is the same from every expert."""
    logits = torch.zeros(N, E)
    for t in range(N):
        logits[t, [(t + j) % E for j in range(K)]] = 3.0
    return [logits.view(1, N, E).clone() for _ in range(L)]  # L x (B=1, T=N, E)


def test_paper_convention_is_1_and_transformers_is_K_at_perfect_balance():
    K = 2
    logits = balanced_router_logits(K=K)
    assert balance.paper_loss(logits, K).item() == pytest.approx(1.0, abs=1e-6)
    transformers_value = olmoe.load_balancing_loss(*olmoe.router_rows(logits), K)  # what Output.aux_loss holds
    assert transformers_value.item() == pytest.approx(K, abs=1e-6)


def test_paper_convention_is_E_over_K_when_every_token_takes_the_same_experts():
    E, K = 8, 2
    logits = torch.full((1, 16, E), -30.0)
    logits[..., :K] = 0.0  # all the probability on experts 0 and 1, equally
    assert balance.paper_loss([logits, logits], K).item() == pytest.approx(E / K, rel=1e-5)


def test_paper_convention_equals_megablocks_on_random_routing():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(3, 10, 8, generator=g) * s for s in (0.5, 2.0, 5.0)]
    assert balance.paper_loss(logits, 2).item() == pytest.approx(megablocks_loss(logits, 2).item(), rel=1e-6)


def test_the_paper_convention_counts_each_micro_batch_apart_and_global_counts_them_together():
    """On 4 micro-batches' router logits, the paper's loss averaged over them is not the loss of all of them at
    once (it counts each micro-batch's own load); balance_loss_paper of them concatenated, global's, is."""
    g = torch.Generator().manual_seed(0)
    parts = [[torch.randn(2, 8, 8, generator=g) * 2 for _ in range(3)] for _ in range(4)]  # 4 x L 3 x (2, 8, E 8)
    whole = balance.paper_loss([torch.cat(ls) for ls in zip(*parts)], 2)
    assert whole.item() == pytest.approx(megablocks_loss([torch.cat(ls) for ls in zip(*parts)], 2).item(), rel=1e-6)
    per_part = sum(balance.paper_loss(p, 2) for p in parts) / 4
    assert abs(per_part.item() - whole.item()) > 1e-3


def test_routing_load_counts_every_expert_of_each_layer_even_with_fewer_tokens_than_experts():
    """(L, E) counts of token-expert pairs, E columns whatever the number of tokens: here 3 tokens and 8 experts, layer
    0 routing every token to experts 0 and 1, layer 1 to experts 6 and 7."""
    E, K = 8, 2
    low, high = torch.full((1, 3, E), -5.0), torch.full((1, 3, E), -5.0)
    low[..., 0], low[..., 1] = 2.0, 1.0
    high[..., 6], high[..., 7] = 1.0, 2.0
    counts = balance.routed_counts([low, high], K)
    assert counts.tolist() == [[3, 3, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 3, 3]]


def test_balance_losses_by_hand_in_both_conventions():
    # E = 2, K = 1, L = 2 layers of N = 2 tokens.
    # layer 0: probs [.75, .25] twice -> both tokens choose expert 0: counts [2, 0], probability sums [1.5, .5]
    # layer 1: probs [.25, .75], [.75, .25] -> one each: counts [1, 1], probability sums [1, 1]
    counts = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    prob_sums = torch.tensor([[1.5, 0.5], [1.0, 1.0]])
    pooled, per_layer = balance.losses_from_counts(counts, prob_sums, n_tokens=2, K=1)
    # per layer, f = counts / (N K), p = sums / N: layer 0: 2 * (1 * .75 + 0 * .25) = 1.5; layer 1: 2 * (.25 + .25)
    assert per_layer.tolist() == [1.5, 1.0]
    # pooled: f = [3, 1] / 4, p = [2.5, 1.5] / 4 -> 2 * (.75 * .625 + .25 * .375) = 1.125, not the mean 1.25
    assert pooled.item() == 1.125
    # uniform routing, E = 4, K = 2: tokens choose {0,1} and {2,3}, all probabilities 1/4:
    # f = [1, 1, 1, 1] / 2 (sums to K = 2), p = 1/4 -> transformers 4 * 4 * (1/2 * 1/4) = 2 = K; normalised 1
    pooled, per_layer = balance.losses_from_counts(torch.tensor([[1.0, 1, 1, 1]]), torch.full((1, 4), 0.5), 2, K=2)
    assert pooled.item() == 2.0 and per_layer.tolist() == [1.0]


def test_transformers_convention_equals_olmoe_load_balancing_loss():
    torch.manual_seed(0)
    L, B, T, E, K = 3, 2, 7, 8, 2
    router_logits = tuple(torch.randn(B, T, E) * 3 for _ in range(L))  # L x (B, T, E)
    expected = olmoe.load_balancing_loss(*olmoe.router_rows(router_logits), K)
    probs = torch.stack([r.flatten(0, 1).softmax(-1, dtype=torch.float32) for r in router_logits])  # (L, N, E)
    counts = balance.expert_counts(probs.topk(K, dim=-1).indices, E)  # (L, E)
    pooled, per_layer = balance.losses_from_counts(counts, probs.sum(1), B * T, K)
    print(f"transformers convention {pooled.item():.6f}, olmoe.load_balancing_loss {expected.item():.6f}")
    assert abs(pooled.item() - expected.item()) < 1e-6
    assert per_layer.shape == (L,)
