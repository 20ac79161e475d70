"""How a model is spread over the processes torchrun starts: joining them, data parallelism (DDP) or sharding
(FSDP2), gradient synchronisation across micro-batches, and the whole state gathered from any of them, so that a
checkpoint is the same whatever the parallelism and any run can resume any other.

    rank, world, device = parallel.start_processes(args.device)   # 0, 1 and the device without torchrun
    model = parallel.wrap(model, device=device, world=world, fsdp=args.fsdp, dtype=dtype)
"""

import os
import warnings

import torch
import torch.distributed as dist

import devices


def started_by_torchrun():
    """Whether torchrun started this process (it sets RANK, WORLD_SIZE and LOCAL_RANK): then it has peers."""
    return "RANK" in os.environ


def world_size():
    """How many processes torchrun started (1 without torchrun), known before joining them."""
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main_process():
    """The first process, or the only one: the one that prints."""
    return os.environ.get("RANK", "0") == "0"


def start_processes(device_name):
    """(rank, world, device): one process on the device named (devices.pick_device), or, under torchrun, this one
    joined to its peers, each on its own GPU (LOCAL_RANK) with NCCL, or on the CPU with gloo."""
    device = devices.pick_device(device_name)
    if not started_by_torchrun():
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size(), device


# --------------------------------------------------------------------------------------------------------------
# The model over the processes


def wrap(model, *, device, world, fsdp, dtype):
    """The float32 model for the processes: alone on the device; wrapped for DDP under torchrun; or, with fsdp,
    sharded by FSDP2 (compute in dtype, gradients reduced in float32, each block one all-gather). fully_shard moves
    each shard to the device itself: the whole model never is on one."""
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (world,))
        # Our blocks return router logits as a view; nothing modifies a block's outputs in place, as it warns of.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        return fully_shard(model, mesh=mesh, mp_policy=policy)
    model.to(device)
    if not started_by_torchrun():
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def unwrap(model):
    """The model itself, unwrapped from DDP (FSDP2 shards it in place)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def is_wrapped(model, fsdp):
    return fsdp or isinstance(model, torch.nn.parallel.DistributedDataParallel)


def sync_gradients(model, fsdp, on):
    """Whether the next backward reduces the gradients over the processes: only a step's last micro-batch does."""
    if fsdp:
        model.set_requires_gradient_sync(on)
    elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = on


def full_state(model, optimizer, fsdp):
    """The model's and the optimizer's whole state on the CPU, keyed by parameter name (every process takes part;
    with FSDP this gathers the shards). The same format whatever the run's parallelism, so any can resume any."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if not optimizer.state:  # before the first step there is none; get_state_dict would take a step to make one
        return (get_model_state_dict(model, options=options) if is_wrapped(model, fsdp) else model.state_dict()), None
    if not is_wrapped(model, fsdp):
        sd, names = optimizer.state_dict(), [n for n, _ in model.named_parameters()]
        return model.state_dict(), dict(state={names[i]: s for i, s in sd["state"].items()},
                                        param_groups=[{**g, "params": [names[i] for i in g["params"]]}
                                                      for g in sd["param_groups"]])
    return get_state_dict(model, optimizer, options=options)


def load_optimizer_state(model, optimizer, state, fsdp):
    """The optimizer's whole state, as full_state gives it, into this run's optimizer (each process its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if is_wrapped(model, fsdp):
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    ids = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    optimizer.load_state_dict(dict(state={ids[n]: s for n, s in state["state"].items()},
                                   param_groups=[{**g, "params": [ids[n] for n in g["params"]]}
                                                 for g in state["param_groups"]]))
