"""How evenly a router spreads tokens over its experts: the load-balancing loss in each convention this project
uses, and the statistics of expert load that train.py logs, routing.py reports and experiments.py compares.

The load-balancing loss is E * sum_e f_e * p_e (Switch Transformer): f_e the share of token-expert pairs routed to
expert e, p_e its mean router probability. The conventions differ in f_e and in how layers combine:
    paper         OLMoE's training code (megablocks' batched_load_balancing_loss, E / (L * T * K) * counts . probs),
                  as MegaBlocks and OLMo-core normalise it: f sums to 1 in each layer, so each layer's loss is 1 at
                  perfect balance, and the layers are averaged. paper_loss.
    transformers  olmoe.load_balancing_loss, the model's Output.aux_loss: all layers' tokens pooled into one f and p,
                  and f sums to K. K (8 for OLMoE) at perfect balance. For one layer it is K x the paper's; over
                  several it is K x the paper's loss of the pooled routing, not K x the mean of the layers' losses.
    global        the paper's, with f counted over a whole optimizer step: every micro-batch of every process (the
                  Qwen team's global-batch balancing, 2025). The same loss however the batch is split.
So a coefficient of 0.01 on transformers' value is about K times as strong as the paper's 0.01.

Shape legend (as in olmoe.py): L layers, N tokens, E experts, K experts routed per token, k experts counted.
"""

import torch
import torch.distributed as dist


def expert_counts(choices, E):
    """N(E_i) per layer: how many tokens included expert i in their top k. (L, N, k) -> (L, E), summing to N*k."""
    L = choices.shape[0]
    offset = torch.arange(L, device=choices.device)[:, None, None] * E  # layer l's experts are bins l*E .. l*E+E-1
    return (choices + offset).flatten().bincount(minlength=L * E).view(L, E)


def routed_counts(router_logits, K):
    """Each layer's expert counts (L, E) from the router logits, L x (B, T, E): the pairs each expert was routed."""
    choices = torch.stack([r.flatten(0, 1).topk(K, dim=-1).indices for r in router_logits])  # (L, N, K)
    return expert_counts(choices, router_logits[0].shape[-1])


def paper_loss(router_logits, K, all_reduce=False):
    """The paper's load-balancing loss from each layer's router logits (B, T, E): 1 at perfect balance, E / K when
    every token takes the same K experts. all_reduce: the counts summed over the processes (global); p stays this
    process's, since averaging the gradients over the processes completes it."""
    per_layer = []
    for logits in router_logits:
        probs = logits.flatten(0, 1).float().softmax(dim=-1)  # (N, E)
        N, E = probs.shape
        counts = torch.bincount(probs.topk(K, dim=-1).indices.flatten(), minlength=E)  # (E,) pairs per expert
        if all_reduce:
            dist.all_reduce(counts)
            N *= dist.get_world_size()
        per_layer.append(E / (N * K) * (counts * probs.mean(dim=0)).sum())
    return torch.stack(per_layer).mean()


def losses_from_counts(counts, prob_sums, n_tokens, K):
    """Both conventions from counts (L, E) of each token's K routed experts and router probabilities summed over
    the n_tokens tokens (L, E): (transformers' pooled loss, a scalar; the paper's loss of each layer, (L,))."""
    L, E = counts.shape
    f = counts.sum(0) / (L * n_tokens)  # (E,) sums to K
    p = prob_sums.sum(0) / (L * n_tokens)  # (E,) sums to 1
    pooled = E * (f * p).sum()
    per_layer = E * (counts / (n_tokens * K) * prob_sums / n_tokens).sum(-1)  # (L,)
    return pooled, per_layer


def load_summary(counts):
    """Per layer, from expert counts (L, E): the largest expert's share of the pairs (1/E when balanced, 1/K when
    every token takes the same K experts) and the entropy of the experts' shares in bits (log2 E when balanced).
    Two tensors (L,), float64."""
    share = counts.double() / counts.sum(dim=-1, keepdim=True).clamp(min=1)  # (L, E)
    entropy = -(share * share.clamp(min=1e-30).log2()).sum(dim=-1)  # (L,)
    return share.max(dim=-1).values, entropy
