"""Expert parallelism: each of W processes holds E/W of every layer's experts, and every token-expert pair is sent
to the process that holds its expert and its result sent back, by two all-to-all exchanges. The routing (the
router and the top-k) stays on every process, each for its own tokens; only the experts are split.

    expert_parallel.shard(model, rank, world)   # keep experts [rank * E/W, (rank + 1) * E/W) of every layer

Dropless: no capacity and no token dropped, so the result does not depend on how many processes there are, and W
processes compute what one does (test_expert_parallel.py). Read dispatch() beside olmoe.moe_batched: the same
sort by expert, with the exchanges in between.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fast
import olmoe


class Exchange(torch.autograd.Function):
    """dist.all_to_all_single as a step of autograd: rows x (sum(send), ...) go out, send[i] of them to process i
    in order, and recv[j] rows come in from each process j. Its gradient is the same exchange the other way: each
    row's gradient goes back to the process the row came from. Every process must call both directions, even with
    nothing to send (gloo's alltoallv takes zero-size splits)."""

    @staticmethod
    def forward(ctx, x, send, recv):
        ctx.send, ctx.recv = send, recv
        out = x.new_empty(sum(recv), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send)
        return out

    @staticmethod
    def backward(ctx, grad):
        return Exchange.apply(grad, ctx.recv, ctx.send), None, None


def dispatch(x, top_w, top_i, experts):
    """moe_batched's result for this process's tokens x (N, D), routed by top_w, top_i (N, K) over all E experts,
    of which this process holds experts.first .. experts.first + E/W."""
    K, E, W = top_i.shape[1], experts.num_experts, experts.world
    local = E // W
    flat = top_i.flatten()  # (P,) expert of each pair, pair p = token p // K
    order = flat.argsort(stable=True)  # pairs sorted by expert, so by the process that holds it
    # 1. How many pairs go to each expert; each process learns how many it gets for each of its own, from each.
    sent = torch.bincount(flat, minlength=E)  # (E,) = (W, local) flattened
    received = torch.empty_like(sent)  # (W * local): [from process j, for local expert e]
    dist.all_to_all_single(received, sent)
    send, recv = sent.view(W, local).sum(1).tolist(), received.view(W, local).sum(1).tolist()
    # 2. The tokens out: rows arrive grouped by the process they come from, each group sorted by expert.
    rows = Exchange.apply(x[order // K], send, recv)  # (R, D)
    # 3. The local experts on them, regrouped by expert, as one grouped product (moe_batched's).
    expert = torch.repeat_interleave(torch.arange(local, device=x.device).repeat(W), received)  # (R,)
    by_expert = expert.argsort(stable=True)
    ends = torch.cumsum(torch.bincount(expert, minlength=local), 0)  # (local,)
    h = rows[by_expert]
    if h.shape[0]:
        gate, up = olmoe.grouped_mm(h, experts.gate_up_proj, ends).chunk(2, dim=-1)
        h = olmoe.grouped_mm(F.silu(gate) * up, experts.down_proj, ends)  # (R, D)
    else:  # nothing came: empty rows, still in the graph, so that the exchanges' gradients run on every process
        h = h * 0
    # 4. The results back, in the order they came, then to the processes they came from.
    h = Exchange.apply(h[by_expert.argsort()], recv, send)  # (P, D) in `order`
    # 5. Each pair weighted by its router weight, summed per token.
    h = h * top_w.flatten()[order, None].to(h.dtype)
    return torch.zeros(x.shape, dtype=h.dtype, device=x.device).index_add_(0, order // K, h)


class ShardedExperts(olmoe.Experts):
    """olmoe.Experts holding E/W of the experts (gate_up_proj (E/W, 2I, D), down_proj (E/W, D, I)); num_experts
    stays E, the router's count. first: the global index of its first expert."""

    def forward(self, x, top_w, top_i):
        return dispatch(x, top_w, top_i, self)


def shard(model, rank, world):
    """Keep only this process's experts in every MoE layer, in place: experts [rank * E/W, (rank + 1) * E/W). Before
    any wrapping (DDP, FSDP2), which must then leave the experts out of its gradient averaging."""

    def sharded(name, module, parent):
        if not isinstance(module, olmoe.Experts):
            return None
        E = module.num_experts
        if E % world:
            raise ValueError(f"expert parallelism needs the experts ({E}) divisible by the processes ({world})")
        local = E // world
        module.__class__ = ShardedExperts
        module.first, module.world = rank * local, world
        for p in ("gate_up_proj", "down_proj"):
            setattr(module, p, torch.nn.Parameter(getattr(module, p).data[rank * local:(rank + 1) * local].clone()))
        return module

    return fast.swap(model, sharded)
