"""Tests for expert_parallel.py: W gloo processes, each holding E/W of the experts, compute what one process holding
them all computes, forward and backward, also when a process receives no tokens at all."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import expert_parallel
import olmoe

CONFIG = dict(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
              num_experts=8, num_experts_per_tok=2, max_position_embeddings=64)


def start(rank, world, store):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)  # every process builds the same model and batch


def train_step(rank, world, store):
    """One forward and backward of the whole batch in this process (the reference), then of this process's share
    of it with the experts sharded: its logits equal the reference's rows; its gradients, averaged over the
    processes as DDP averages them (the experts' divided by W instead: their own processes summed every process's
    share into them), equal the reference's."""
    start(rank, world, store)
    model = olmoe.Transformer(olmoe.OlmoeConfig(**CONFIG))
    ids = torch.randint(0, 64, (2 * world, 12))
    targets = torch.randint(0, 64, (2 * world, 12))
    logits = model(ids).logits
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    expert_parallel.shard(model, rank, world)
    mine = slice(2 * rank, 2 * rank + 2)
    sharded_logits = model(ids[mine]).logits
    torch.testing.assert_close(sharded_logits, logits[mine].detach(), rtol=1e-5, atol=1e-5)
    F.cross_entropy(sharded_logits.flatten(0, 1), targets[mine].flatten()).backward()
    local = CONFIG["num_experts"] // world
    for name, p in model.named_parameters():
        if "experts" in name:  # this process's experts: the reference's slice
            torch.testing.assert_close(p.grad / world, reference[name][rank * local:(rank + 1) * local],
                                       rtol=1e-4, atol=1e-6, msg=name)
        else:
            dist.all_reduce(p.grad)
            torch.testing.assert_close(p.grad / world, reference[name], rtol=1e-4, atol=1e-6, msg=name)
    dist.destroy_process_group()


def nothing_received(rank, world, store):
    """Every pair routed to expert 0, which process 0 holds: the others receive no rows, and still take part in
    both exchanges and their gradients. The result is moe_naive's over all the experts."""
    start(rank, world, store)
    experts = olmoe.Experts(8, 32, 16)
    x = torch.randn(5, 32, requires_grad=True)
    top_w, top_i = torch.rand(5, 1), torch.zeros(5, 1, dtype=torch.long)
    reference = olmoe.moe_naive(x, top_w, top_i, experts)
    (gx,) = torch.autograd.grad(reference.sum(), x)
    sharded = olmoe.Experts(8, 32, 16)
    sharded.load_state_dict(experts.state_dict())
    expert_parallel.shard(sharded, rank, world)
    y = sharded(x, top_w, top_i)
    torch.testing.assert_close(y, reference.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(y.sum(), x)[0], gx, rtol=1e-5, atol=1e-6)
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", [train_step, nothing_received], ids=["train step", "nothing received"])
def test_w_processes_compute_what_one_does(tmp_path, world, case):
    mp.spawn(case, args=(world, str(tmp_path / "store")), nprocs=world)


def test_experts_not_divisible_by_the_processes_is_one_clear_error():
    model = olmoe.Transformer(olmoe.OlmoeConfig(**CONFIG))
    with pytest.raises(ValueError, match=r"the experts \(8\) divisible by the processes \(3\)"):
        expert_parallel.shard(model, 0, 3)
