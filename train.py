"""Train OLMoE or OLMo2 with the OLMoE paper's recipe: from scratch, or from a checkpoint; on a CPU or many GPUs.

    python train.py --text code='py/*.py' --text prose=docs.txt --out runs/small --model olmoe-cpu --lr 3e-3
    python train.py --text chat=sft.txt --out runs/ft --init allenai/OLMoE-1B-7B-0924 --lr 1e-5
    torchrun --nproc_per_node 8 train.py ... --fsdp          # data parallel; --fsdp also shards the model
    python train.py --resume runs/small                      # continue the run from its last checkpoint, exactly
    python train.py --compare-runs runs/a runs/b --out ab.png  # several runs' curves side by side

Read like nanoGPT's train.py: the recipe first (presets -> batches -> learning rate -> initialisation -> the router
losses -> evaluation), then the run: set_up does everything before the first step, forward_backward and step take
one optimizer step, and train() is the loop, one comment per phase; the command line last. What it leans on has a
file of its own: text.py (the text, the tokenizer, the token file), checkpoints.py (writing and resuming),
runlog.py (log.jsonl and its curves), balance.py (the load-balancing conventions), parallel.py (torchrun's
processes, DDP and FSDP2), devices.py (device and dtype) and measure.py (the matmul rate and active parameters
behind MFU).

The recipe (allenai/OLMoE, configs/OLMoE-1B-7B-0924.yml) is the default: AdamW lr 4e-4, betas (0.9, 0.95), eps 1e-8,
weight decay 0.1 on every parameter, linear warmup then cosine to 0.1x the peak, gradient clipping at 1.0,
load-balancing coefficient 0.01 and router z-loss coefficient 0.001, normal(0, 0.02) initialisation cut at 3
standard deviations, bf16 mixed precision (float32 master weights and optimizer state) where the device has it.
"""

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import balance
import checkpoints
import cli
import devices
import measure
import olmoe
import parallel
import runlog
import text
import variants

# --------------------------------------------------------------------------------------------------------------
# Presets for training from scratch. The vocabulary size comes from the tokenizer trained on the text.
#
# olmoe-cpu keeps OLMoE's design (64 experts, 8 per token, QK-norm, SwiGLU experts, both router losses) at a
# size a 2-core CPU trains in about 10 minutes; docs/training.md gives the measured time and loss. olmo2-cpu is its
# dense sibling with the same attention. The released shapes (olmoe.PRESETS) can be trained from scratch too.

PRESETS = {
    "olmoe-cpu": lambda: olmoe.OlmoeConfig(hidden_size=128, intermediate_size=64, num_hidden_layers=4,
                                           num_attention_heads=4, num_experts=64, num_experts_per_tok=8,
                                           max_position_embeddings=4096),
    "olmo2-cpu": lambda: olmoe.Olmo2Config(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                                           num_attention_heads=4, max_position_embeddings=4096),
    **olmoe.PRESETS,
}


# --------------------------------------------------------------------------------------------------------------
# Batches, learning rate, initialisation


def get_batch(tokens, n_train, seq_len, batch_size, seed, step):
    """The step's batch_size random windows of the training tokens, as nanoGPT samples them: inputs x and next-token
    targets y, (B, T) each. The windows depend only on (seed, step), so a resumed run reads what it would have."""
    starts = np.random.default_rng([seed, step]).integers(0, n_train - seq_len, size=batch_size)
    w = torch.from_numpy(np.stack([tokens[s:s + seq_len + 1].astype(np.int64) for s in starts]))  # (B, T+1)
    return w[:, :-1], w[:, 1:]


def get_lr(step, peak, warmup, steps, final_ratio=0.1):
    """The learning rate of optimizer step `step` (1 .. steps): linear warmup, then cosine down to final_ratio x
    the peak (OLMoE's schedule)."""
    if step <= warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(1, steps - warmup)  # 0 -> 1
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def warmup_steps(args):
    return args.warmup_steps if args.warmup_steps is not None else min(2000, args.steps // 10)


def init_weights(model, seed):
    """OLMoE's initialisation: norms 1, every other weight normal(0, 0.02) cut at 3 standard deviations."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                torch.nn.init.trunc_normal_(p, std=0.02, a=-0.06, b=0.06)


# --------------------------------------------------------------------------------------------------------------
# The router losses: the load-balancing loss in the convention --lb-convention names (balance.py), and the z-loss


def balance_loss(output, args, K):
    """This micro-batch's load-balancing loss, or None under global, which waits for the step's last one."""
    if args.lb_convention == "paper":
        return balance.paper_loss(output.router_logits, K)
    if args.lb_convention == "transformers":
        return output.aux_loss
    return None


# --------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, tokens, index, *, seq_len, batch_size, max_tokens, autocast, K):
    """Validation loss (nats per token) and bits per byte of each domain, over the first max_tokens of its held-out
    split cut into consecutive windows; and each layer's expert counts (L, E) over all of them (OLMoE only).
    Bits per byte = nats / ln 2 over the bytes those tokens stand for, at the split's bytes per token."""
    device = next(model.parameters()).device
    result, counts = {}, None
    for name, v in index["val"].items():
        a, b = v["range"]
        ids = torch.from_numpy(tokens[a:min(b, a + max_tokens + 1)].astype(np.int64))
        T = min(seq_len, len(ids) - 1)
        n = (len(ids) - 1) // T
        x = ids[:n * T].view(n, T)  # (n, T)
        y = ids[1:n * T + 1].view(n, T)  # (n, T)
        nats = 0.0
        for i in range(0, n, batch_size):
            with autocast():
                out = model(x[i:i + batch_size].to(device))
            nats += F.cross_entropy(out.logits.flatten(0, 1).float(), y[i:i + batch_size].flatten().to(device),
                                    reduction="sum").item()
            if out.router_logits:
                c = balance.routed_counts(out.router_logits, K).cpu()
                counts = c if counts is None else counts + c
        loss = nats / (n * T)
        result[name] = dict(loss=loss, bpb=loss / math.log(2) * (b - a) / v["bytes"])
    return result, counts


def log_evaluation(run, step, train_loss, extra):
    """Validation loss and bits per byte of each domain, and the experts' load: one line of log.jsonl and stdout."""
    args, K = run.args, getattr(run.config, "num_experts_per_tok", 0)
    run.model.eval()
    eval_model = run.model if args.fsdp else parallel.unwrap(run.model)  # FSDP: every process; DDP's wrapper: training
    val, counts = evaluate(eval_model, run.tokens, run.index, seq_len=args.seq_len, batch_size=run.micro,
                           max_tokens=args.eval_tokens, autocast=run.autocast, K=K)
    run.model.train()
    record = dict(step=step, tokens=step * args.batch_size * args.seq_len, train_loss=train_loss, **extra,
                  lr=get_lr(max(step, 1), args.lr, warmup_steps(args), args.steps),
                  val={d: v["loss"] for d, v in val.items()}, val_bpb={d: v["bpb"] for d, v in val.items()})
    if counts is not None:
        record["max_share"], record["entropy_bits"] = (t.tolist() for t in balance.load_summary(counts))
    if run.is_main:
        runlog.append(run.out, record)
        trained = f"train {train_loss:.3f} | " if train_loss is not None else ""
        line = (f"step {step} | {record['tokens']} tokens | {trained}val "
                + ", ".join(f"{d} {v['loss']:.3f} ({v['bpb']:.3f} bpb)" for d, v in val.items()))
        if counts is not None:
            line += " | largest expert share per layer " + " ".join(f"{s:.3f}" for s in record["max_share"])
        tqdm.write(line, file=sys.stdout)


# --------------------------------------------------------------------------------------------------------------
# Set-up: everything before the first step


def check_args(args):
    """The flags' own limits, before anything runs."""
    for flag in ("steps", "batch_size", "seq_len", "save_every", "vocab_size", "eval_tokens"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected at least 1")
    if not 0 < args.val_fraction < 1 or args.eval_every < 0:
        raise ValueError(f"need 0 < --val-fraction < 1 and --eval-every >= 0, got {args.val_fraction} and "
                         f"{args.eval_every}")
    if args.model and args.init:
        raise ValueError("--model and --init exclude each other: --model trains a preset from scratch, --init "
                         "continues from a checkpoint")
    if args.model and args.model not in PRESETS and not (args.model.endswith(".json") and Path(args.model).is_file()):
        raise ValueError(f"--model {args.model!r}: unknown preset (expected one of {', '.join(PRESETS)}, "
                         "or a config.json file of your own)")
    if args.upcycle and not args.init:
        raise ValueError("--upcycle E K needs --init: the dense checkpoint (an OLMoE of one expert) to upcycle")
    if args.dtype not in (None, "float32", "bfloat16"):
        raise ValueError(f"--dtype {args.dtype!r}: expected float32 or bfloat16")
    if args.fsdp and not parallel.started_by_torchrun():
        raise ValueError("--fsdp shards over processes: start it with torchrun --nproc_per_node N")


@dataclass(kw_only=True)
class Run:
    """What set_up decides and every step reads: the processes, the text's tokens, the model and its optimizer."""
    args: argparse.Namespace
    out: Path
    rank: int  # this process, of world (torchrun's RANK and WORLD_SIZE; 0 of 1 without torchrun)
    world: int
    device: torch.device
    dtype: torch.dtype  # bfloat16: autocast; the weights and AdamW's state stay float32
    micro: int  # sequences per forward pass
    accumulate: int  # micro-batches per process per optimizer step
    domains: list
    tokenizer: object
    config: olmoe.Config
    tokens: np.ndarray  # the token file, memory-mapped: training tokens, then each domain's held-out ones
    index: dict  # where each split lies in it (tokens.json)
    init: Path | None  # the checkpoint fine-tuned, if any
    model: torch.nn.Module  # wrapped for DDP or FSDP when several processes train
    optimizer: torch.optim.Optimizer
    step: int = 0  # the optimizer steps the weights hold
    resumed: Path | None = None  # the checkpoint this run continues, if any

    @property
    def distributed(self):
        return parallel.started_by_torchrun()

    @property
    def is_main(self):
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)


def batch_split(args, world):
    """(sequences per forward pass, micro-batches per process per step): each process takes batch_size / world."""
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} does not divide over {world} processes")
    micro = args.micro_batch_size or args.batch_size // world
    if (args.batch_size // world) % micro:
        raise ValueError(f"--micro-batch-size {micro} does not divide the {args.batch_size // world} sequences "
                         f"each of the {world} processes takes per step")
    return micro, args.batch_size // world // micro


def model_config(args, tokenizer):
    """The config of a model trained from scratch: the preset's, or a config.json's, with the tokenizer's
    vocabulary (padded to a multiple of 64, as the released models'), eos and padding ids."""
    if args.model and args.model.endswith(".json"):
        config = olmoe.config_from_dict(json.loads(Path(args.model).read_text()))
    else:
        config = PRESETS[args.model or "olmoe-cpu"]()
    config.vocab_size = -(-tokenizer.get_vocab_size() // 64) * 64
    config.eos_token_id, config.pad_token_id = tokenizer.token_to_id(text.EOS), tokenizer.token_to_id(text.PAD)
    config.dtype = "float32"
    return config


def check_config(args, config, init, resume, tokenizer):
    """The model's config, with the router coefficients the run trains with, checked against the flags and the
    checkpoint it resumes."""
    if args.upcycle:
        config = variants.upcycle_config(config, *args.upcycle)
    if config.model_type == "olmoe":  # the coefficients trained with, in the convention the config's readers use:
        # transformers' aux loss reads K at balance, the paper's 1, so the paper's lb_coef is lb_coef / K there
        K = config.num_experts_per_tok
        config.router_aux_loss_coef = args.lb_coef if args.lb_convention == "transformers" else args.lb_coef / K
        config.router_z_loss_coef = args.z_coef
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    if eos is None:
        raise ValueError(f"{init}: the config has no eos_token_id to separate documents with")
    if args.seq_len > config.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} is beyond the model's context of "
                         f"{config.max_position_embeddings} tokens")
    if resume:
        checkpoints.check_resume(resume, config, tokenizer)
    return config, eos


def set_up_model(args, config, *, device, world, dtype, checkpoint, upcycle=None):
    """The model in float32 (the master weights: from the checkpoint, upcycled if asked, else initialised), spread
    over the processes (parallel.wrap: DDP, or FSDP2 with --fsdp), and AdamW on every parameter."""
    if checkpoint:
        model = variants.load_model(checkpoint, device="cpu", dtype=torch.float32).train()
        if upcycle:  # a dense model's MLP copied into every expert, a new router (variants.py)
            model = variants.upcycle(model, *upcycle, seed=args.seed).train()
    else:
        model = olmoe.Transformer(config)
        init_weights(model, args.seed)
    if args.variant:  # an architecture no released checkpoint has (variants.py)
        variants.apply(model, args.variant)
    model = parallel.wrap(model, device=device, world=world, fsdp=args.fsdp, dtype=dtype)
    return model, torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                                    weight_decay=args.weight_decay)


def set_up(args) -> Run:
    """Everything before the first step: processes, text, tokenizer and config, the token file, the model and its
    optimizer, and what --resume restores. Each user error is raised before any work is lost."""
    check_args(args)
    micro, accumulate = batch_split(args, parallel.world_size())  # before joining peers: an error leaves at once
    rank, world, device = parallel.start_processes(args.device)
    is_main, distributed = rank == 0, parallel.started_by_torchrun()
    dtype = devices.training_dtype(args.dtype, device)
    out = Path(args.out)
    resume = checkpoints.find_checkpoint(args.resume) if args.resume else None
    if not resume and any(out.glob("step-*")):
        raise ValueError(f"--out {out} already holds checkpoints ({sorted(out.glob('step-*'))[-1].name}): pass "
                         f"--resume {out} to continue that run, or choose another --out")
    init = checkpoints.checkpoint_dir(args.init) if args.init else None
    barrier = dist.barrier if distributed else lambda: None
    splits, tokenizer = text.prepare(out, args.text, val_fraction=args.val_fraction, vocab_size=args.vocab_size,
                                     tokenizer=checkpoints.load_tokenizer(init)[0] if init else None,
                                     is_main=is_main, barrier=barrier)
    config = variants.read_config(init)[0] if init else model_config(args, tokenizer)
    config, eos = check_config(args, config, init, resume, tokenizer)
    tokens, index = text.prepare_tokens(out, tokenizer, eos, splits, is_main=is_main, barrier=barrier)
    if index["train"][1] <= args.seq_len:
        raise ValueError(f"only {index['train'][1]} training tokens: too few for one window of --seq-len "
                         f"{args.seq_len}")
    with cli.saying(is_main, f"loading {resume or init}" if resume or init else "initialising the model"):
        model, optimizer = set_up_model(args, config, device=device, world=world, dtype=dtype,
                                        checkpoint=resume or init, upcycle=None if resume else args.upcycle)
    run = Run(args=args, out=out, rank=rank, world=world, device=device, dtype=dtype, micro=micro,
              accumulate=accumulate, domains=list(splits), tokenizer=tokenizer, config=config, tokens=tokens,
              index=index, init=init, model=model, optimizer=optimizer, resumed=resume)
    if resume:
        run.step = checkpoints.restore(resume, run.model, run.optimizer, args.fsdp)
        if is_main:
            runlog.drop_after(out, run.step)
    return run


def describe(run):
    """The line a run starts with: the model, the data, the processes and the batch."""
    c, n = run.config, sum(p.numel() for p in parallel.unwrap(run.model).parameters())
    return (f"{c.model_type} {n / 1e6:.2f}M parameters ({measure.active_params(c) / 1e6:.2f}M active), "
            f"{run.index['train'][1]} training tokens, {run.world} process(es) on {run.device.type}, "
            f"{str(run.dtype).removeprefix('torch.')}; {run.args.batch_size} x {run.args.seq_len} tokens per step "
            f"({run.accumulate} micro-batch(es) of {run.micro} per process)")


# --------------------------------------------------------------------------------------------------------------
# One optimizer step, and saving


def forward_backward(run, step):
    """The gradients of one optimizer step: this process's share of the step's windows, in micro-batches whose
    gradients add up (reduced over the processes once, after the last). Returns the step's mean cross-entropy,
    load-balancing loss and z-loss over all processes."""
    args, share = run.args, run.args.batch_size // run.world
    x, y = get_batch(run.tokens, run.index["train"][1], args.seq_len, args.batch_size, args.seed, step)  # (B, T)
    x, y = x[run.rank * share:(run.rank + 1) * share], y[run.rank * share:(run.rank + 1) * share]
    sums = torch.zeros(3, device=run.device)  # cross-entropy, load balancing, z-loss: means over micro-batches
    kept, router_logits = 0.0, []  # global: the step's loss and router logits until its last forward
    K = getattr(run.config, "num_experts_per_tok", 0)
    for i in range(run.accumulate):
        parallel.sync_gradients(run.model, args.fsdp, on=i == run.accumulate - 1)
        xb, yb = x[i * run.micro:(i + 1) * run.micro].to(run.device), y[i * run.micro:(i + 1) * run.micro]
        with run.autocast():
            output = run.model(xb)
        ce = F.cross_entropy(output.logits.flatten(0, 1).float(), yb.to(run.device).flatten())
        lb = z = torch.zeros((), device=run.device)
        if run.config.model_type == "olmoe":
            z, lb = output.z_loss, balance_loss(output, args, K)
            if lb is None:  # global: the load-balancing term waits for the step's last micro-batch
                router_logits.append(output.router_logits)
                lb = torch.zeros((), device=run.device)
        loss = (ce + args.lb_coef * lb + args.z_coef * z) / run.accumulate
        if router_logits:
            kept = kept + loss
        else:
            loss.backward()
        sums += torch.stack([ce.detach(), lb.detach(), z.detach()]) / run.accumulate
    if router_logits:  # global: each layer's logits of every micro-batch together, counted over every process
        lb = balance.paper_loss([torch.cat(ls) for ls in zip(*router_logits)], K, all_reduce=run.distributed)
        (kept + args.lb_coef * lb).backward()
        sums[1] = lb.detach()
    if run.distributed:
        dist.all_reduce(sums)
        sums /= run.world
    return sums.tolist()


def step(run, last_saved):
    """Optimizer step run.step + 1: set the learning rate, take the gradients, clip them, update the weights.
    Returns the step's three losses and the gradient norm; stops before an update whose loss is not finite."""
    args = run.args
    # determine and set the learning rate for this iteration
    for group in run.optimizer.param_groups:
        group["lr"] = get_lr(run.step + 1, args.lr, warmup_steps(args), args.steps)
    # forward backward, with gradient accumulation over micro-batches; stop before a non-finite update
    ce, lb, z = forward_backward(run, run.step + 1)
    if not math.isfinite(ce + lb + z):
        kept = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was saved yet"
        raise ValueError(f"the loss became {ce + lb + z} at step {run.step + 1}; stopped before updating the "
                         f"weights, and {kept}. Lower --lr or raise --warmup-steps (in bfloat16, try float32)")
    # clip the gradient, update the weights
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return ce, lb, z, grad_norm


def save(run, step):
    """DIR/step-NNNNNN: the weights and the optimizer's state gathered whole (every process takes part), written
    by the first process."""
    weights, optimizer_state = parallel.full_state(run.model, run.optimizer, run.args.fsdp)
    if run.is_main:
        train_state = dict(step=step, rng=torch.get_rng_state(), args=vars(run.args), world_size=run.world)
        checkpoints.save_checkpoint(run.out, step, config=run.config, weights=weights, optimizer_state=optimizer_state,
                                    tokenizer=run.tokenizer, train_state=train_state)
        checkpoints.prune(run.out, run.args.keep_resumable)
    if run.distributed:
        dist.barrier()
    return run.out / f"step-{step:06d}"


def start(run):
    """Before the first step: the line describing the run, and the untrained (or just upcycled) model evaluated
    and saved, to compare with. Returns the checkpoint saved last."""
    args = run.args
    if run.is_main:
        print(describe(run), file=sys.stderr)
    if run.step == 0 and args.eval_every:
        if run.is_main:
            print(f"evaluating the untrained model on {args.eval_tokens} held-out tokens of each domain",
                  file=sys.stderr)
        log_evaluation(run, 0, None, {})
    if run.step == 0 and (not run.init or args.upcycle):
        with cli.saying(run.is_main, f"saving the {'upcycled' if args.upcycle else 'untrained'} model as "
                                     f"{run.out / 'step-000000'}"):
            return save(run, 0)
    return run.resumed


def finish(run):
    """The curves of the run, and (several processes) leaving together."""
    c = run.config
    if run.is_main and (run.out / "log.jsonl").is_file():
        n = sum(p.numel() for p in parallel.unwrap(run.model).parameters())
        what = f"{c.model_type}, {n / 1e6:.1f}M parameters" + (
            f" ({c.num_experts} experts, {c.num_experts_per_tok} per token)" if c.model_type == "olmoe" else "")
        origin = (f"upcycled from {run.args.init}" if run.args.upcycle else f"fine-tuned from {run.args.init}"
                  if run.init else "from scratch")
        runlog.plot(run.out, run.out / "curves.png", f"run {run.out.name}: {what}, {origin}, on "
                    f"{', '.join(run.domains)}", balanced=1 / c.num_experts if c.model_type == "olmoe" else None)
    if run.distributed:
        # All ranks leave together: FSDP2's DTensor caches keep the gloo process group alive past
        # destroy_process_group, and a rank that reached interpreter shutdown while rank 0 was still plotting
        # could abort there ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------------
# The loop


ETA_AFTER = 10  # the bar shows the time left once this many steps are timed: one step's time says little of 1500
NO_ETA = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


def train(args):
    run = set_up(args)
    first, tokens_per_step, train_s = run.step, args.batch_size * args.seq_len, 0.0  # train_s: steps' seconds only
    flops_per_step = 6 * measure.active_params(run.config) * tokens_per_step
    peak, sync = measure.matmul_rate(run.device, run.dtype) * run.world, measure.synchronizer(run.device)
    last_saved = start(run)
    bar = tqdm(total=args.steps, initial=run.step, desc="training", unit="step", file=sys.stderr,
               disable=not run.is_main, dynamic_ncols=True, bar_format=NO_ETA)
    with cli.ctrl_c_deferred() as interrupted, bar:  # Ctrl-C: the step under way finishes, is saved, and it stops
        try:
            while run.step < args.steps:
                # one optimizer step, timed
                t0 = time.perf_counter()
                ce, lb, z, grad_norm = step(run, last_saved)
                sync()
                dt = time.perf_counter() - t0
                train_s += dt
                if run.step - first == ETA_AFTER:
                    bar.bar_format = None  # tqdm's own format, with the time left
                bar.update(1)
                bar.set_postfix(loss=f"{ce:.3f}", tok_s=f"{tokens_per_step / dt:.0f}",
                                mfu=f"{flops_per_step / dt / peak:.1%}")
                # evaluate, log and save
                if args.eval_every and (run.step % args.eval_every == 0 or run.step == args.steps):
                    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP
                    log_evaluation(run, run.step, ce, dict(lb_loss=lb, z_loss=z, grad_norm=grad_norm.item(),
                                                           train_s=train_s, tokens_per_s=tokens_per_step / dt,
                                                           mfu=flops_per_step / dt / peak))
                if run.step % args.save_every == 0 or run.step == args.steps:
                    last_saved = save(run, run.step)
                stop = torch.tensor(float(bool(interrupted)), device=run.device)
                if run.distributed:  # every process stops at the same step, whichever saw the Ctrl-C
                    dist.all_reduce(stop, op=dist.ReduceOp.MAX)
                if stop.item():
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            # Keep what was trained. A step interrupted before optimizer.step() (a KeyboardInterrupt raised before
            # the handler was in place) left the weights as the step before it had them.
            bar.close()
            if run.step and last_saved != run.out / f"step-{run.step:06d}":
                if run.is_main:
                    print(f"\ninterrupted: saving step {run.step}", file=sys.stderr)
                run.optimizer.zero_grad(set_to_none=True)
                save(run, run.step)
            raise
    finish(run)
    return last_saved


# --------------------------------------------------------------------------------------------------------------
# Command line


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", action="append", metavar="NAME=FILE_OR_GLOB",
                   help="a domain's name and its text files; repeat for several domains")
    p.add_argument("--out", default=None, help="directory for the token file, checkpoints, log.jsonl and curves.png "
                   "(with --compare-runs: the PNG to draw; with --resume: the run's directory by default)")
    p.add_argument("--compare-runs", nargs="+", metavar="DIR", help="draw these runs' curves side by side into "
                   "--out, and train nothing")
    p.add_argument("--model", default=None, help=f"preset to train from scratch: {', '.join(PRESETS)} "
                   "(default olmoe-cpu), or a config.json file of your own")
    p.add_argument("--init", default=None, metavar="ID_OR_DIR", help="checkpoint to continue from or fine-tune")
    p.add_argument("--variant", choices=list(variants.VARIANTS), default=None, help="an OLMoE architecture no "
                   "released checkpoint has (variants.py); its checkpoints load with variants.load_model")
    p.add_argument("--upcycle", type=int, nargs=2, metavar=("E", "K"), default=None, help="with --init of an OLMoE "
                   "of one expert (a dense model): train an OLMoE of E copies of its MLP, K per token (upcycling)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue a run exactly, with the flags it was "
                   "started with, from a checkpoint or the last one saved in a run's directory")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps in all")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step, over all processes")
    p.add_argument("--micro-batch-size", type=int, default=None, help="sequences per forward pass in each process "
                   "(default: all of its share; fewer accumulates gradients)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=4e-4, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 2000 as OLMoE, at most a tenth of --steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--lb-coef", type=float, default=0.01, help="load-balancing loss coefficient")
    p.add_argument("--lb-convention", choices=["paper", "transformers", "global"], default="paper",
                   help="paper: per layer, averaged, 1 when balanced; transformers: pooled, K when balanced; global: "
                   "the paper's over the whole step (every micro-batch and process; no memory saved by micro-batches)")
    p.add_argument("--z-coef", type=float, default=0.001, help="router z-loss coefficient")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary trained from scratch")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of each domain held out for validation")
    p.add_argument("--eval-every", type=int, default=100, help="steps between evaluations (0: never)")
    p.add_argument("--eval-tokens", type=int, default=16384, help="validation tokens per domain per evaluation")
    p.add_argument("--save-every", type=int, default=500, help="steps between checkpoints (and at the end)")
    p.add_argument("--keep-resumable", type=int, default=1, metavar="N", help="the last N checkpoints keep the "
                   "optimizer's state for --resume (twice the weights' size); the others keep the weights alone")
    p.add_argument("--seed", type=int, default=0, help="initialisation and the batches' windows")
    p.add_argument("--device", default=None, help="default: cuda, else mps, else cpu")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (autocast); default bfloat16 where the device "
                   "has it natively (CUDA from Ampere on), else float32")
    p.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state (FSDP2)")
    return p


# What a resumed run may change: how long it runs, how often it saves and evaluates, and where and how its processes
# share the work (a checkpoint is the same whatever the parallelism). Every other flag makes another run: refused.
MAY_CHANGE = ("resume", "out", "steps", "save_every", "eval_every", "keep_resumable", "device", "micro_batch_size",
              "fsdp")


def parse_args(argv=None):
    """The flags; with --resume, the run's own (saved in its checkpoints' trainer_state.json) under those given."""
    args = parser().parse_args(argv)
    if args.resume and not args.compare_runs:
        return checkpoints.resumed_args(parser, argv, args, MAY_CHANGE)
    if not args.out:
        raise ValueError("--out DIR: where to write the run (or --resume DIR to continue one)")
    return args


def run_command(argv):
    args = parse_args(argv)
    if args.compare_runs:
        return runlog.plot_runs(args.compare_runs, args.out)
    if not args.text:
        raise ValueError("--text NAME=FILE_OR_GLOB: give at least one text to train on")
    return train(args)


def main(argv=None):
    cli.run(run_command, argv, errors=(ValueError, OSError))


if __name__ == "__main__":
    main()
