"""Train OLMoE or OLMo2 with the OLMoE paper's recipe: from scratch, or from a checkpoint; on a CPU or many GPUs.

    python train.py --text code='py/*.py' --text prose=docs.txt --out runs/small --model olmoe-cpu --lr 3e-3
    python train.py --text chat=sft.txt --out runs/ft --init allenai/OLMoE-1B-7B-0924 --lr 1e-5
    torchrun --nproc_per_node 8 train.py ... --fsdp          # data parallel; --fsdp also shards the model
    python train.py --resume runs/small                      # continue the run from its last checkpoint, exactly

Read like nanoGPT's train.py: the pieces first (presets -> text and tokens (tokenizer, token file, get_batch) ->
the router losses -> learning rate -> evaluation -> checkpoints), then the run: set_up does everything before the
first step, and train() is the loop, one comment per phase; the command line last.

The recipe (allenai/OLMoE, configs/OLMoE-1B-7B-0924.yml) is the default: AdamW lr 4e-4, betas (0.9, 0.95), eps 1e-8,
weight decay 0.1 on every parameter, linear warmup then cosine to 0.1x the peak, gradient clipping at 1.0,
load-balancing coefficient 0.01 and router z-loss coefficient 0.001, normal(0, 0.02) initialisation cut at 3
standard deviations, bf16 mixed precision (float32 master weights and optimizer state) where the device has it.
"""

import argparse
import contextlib
import glob
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import generate
import olmoe
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

EOS, PAD = "<|endoftext|>", "<|padding|>"  # the special tokens of a tokenizer trained here: ids 0 and 1


class TrainError(Exception):
    """Something the user can fix: the message names it and says what was expected."""


# --------------------------------------------------------------------------------------------------------------
# Text and tokens


def read_domains(specs) -> dict:
    """--text NAME=FILE_OR_GLOB, repeated -> {name: [each file's text, in sorted order]}."""
    domains = {}
    for spec in specs:
        name, sep, pattern = spec.partition("=")
        if not sep or not name or not pattern:
            raise TrainError(f"--text {spec!r}: expected NAME=FILE_OR_GLOB, e.g. code='src/*.py'")
        files = sorted(glob.glob(os.path.expanduser(pattern), recursive=True)) or [pattern]
        files = [f for f in files if not os.path.isdir(f)]
        if not files or not os.path.isfile(files[0]):
            raise TrainError(f"--text {spec}: no such file")
        texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
        if not any(t.strip() for t in texts):
            raise TrainError(f"--text {spec}: empty (no text in {len(files)} file(s))")
        domains.setdefault(name, []).extend(t for t in texts if t.strip())
    return domains


def split_domain(docs, val_fraction):
    """A domain's documents -> (train docs, validation docs): the last val_fraction of its characters, whole
    documents from the end, and the one that reaches past that point cut at a line (a single file is cut too)."""
    need, k = val_fraction * sum(len(d) for d in docs), len(docs)
    while k > 1 and need >= len(docs[k - 1]):
        k, need = k - 1, need - len(docs[k - 1])
    d = docs[k - 1]
    cut = d.rfind("\n", 0, len(d) - int(need)) + 1 or len(d) - int(need)
    return [t for t in docs[:k - 1] + [d[:cut]] if t], [h for h in [d[cut:]] + docs[k:] if h]


def train_tokenizer(docs, vocab_size):
    """A byte-level BPE tokenizer (GPT-2's kind, as OLMoE's) trained on the training text: every byte sequence
    has a tokenization, and multi-byte characters may span several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(docs, trainer)
    return tokenizer


def build_token_file(out, tokenizer, eos, splits):
    """Tokenize every document once into out/tokens.bin, a flat array of token ids with eos after each document:
    all domains' training tokens first (so one range holds them all), then each domain's validation tokens.
    Returns the index, also written to out/tokens.json; a token file of the same tokenizer and text is reused."""
    key = hashlib.sha256(tokenizer.to_str().encode())
    for name, (tr, va) in splits.items():
        for d in [name, *tr, "\0", *va]:
            key.update(d.encode("utf-8", errors="replace") + b"\0")
    index_file = out / "tokens.json"
    if index_file.is_file() and (index := json.loads(index_file.read_text())).get("key") == key.hexdigest():
        return index

    def encode(docs):
        ids = []
        for enc in tokenizer.encode_batch(docs, add_special_tokens=False):
            ids.extend(enc.ids + [eos])
        return ids

    train_ids = [encode(tr) for tr, _ in splits.values()]
    val_ids = [encode(va) for _, va in splits.values()]
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.uint32
    n_train = sum(map(len, train_ids))
    index = dict(key=key.hexdigest(), dtype=np.dtype(dtype).name, train=[0, n_train], val={})
    tokens = np.memmap(out / "tokens.bin.tmp", dtype=dtype, mode="w+", shape=(n_train + sum(map(len, val_ids)),))
    pos = 0
    for ids in train_ids:
        tokens[pos:pos + len(ids)] = ids
        pos += len(ids)
    for (name, (_, va)), ids in zip(splits.items(), val_ids):
        tokens[pos:pos + len(ids)] = ids
        index["val"][name] = dict(range=[pos, pos + len(ids)], bytes=sum(len(d.encode()) for d in va))
        pos += len(ids)
    tokens.flush()
    del tokens
    os.replace(out / "tokens.bin.tmp", out / "tokens.bin")  # the index names a complete token file only
    index_file.write_text(json.dumps(index, indent=1))
    return index


def get_batch(tokens, n_train, seq_len, batch_size, seed, step):
    """The step's batch_size random windows of the training tokens, as nanoGPT samples them: inputs x and next-token
    targets y, (B, T) each. The windows depend only on (seed, step), so a resumed run reads what it would have."""
    starts = np.random.default_rng([seed, step]).integers(0, n_train - seq_len, size=batch_size)
    w = torch.from_numpy(np.stack([tokens[s:s + seq_len + 1].astype(np.int64) for s in starts]))  # (B, T+1)
    return w[:, :-1], w[:, 1:]


# --------------------------------------------------------------------------------------------------------------
# The router losses
#
# The load-balancing loss is E * sum_e f_e * p_e (Switch Transformer): f_e the share of token-expert pairs routed to
# expert e, p_e its mean router probability. Two conventions scale it differently:
#   paper         OLMoE's training code (megablocks' batched_load_balancing_loss, E / (L * T * K) * counts . probs):
#                 each layer's loss is 1 at perfect balance, and the layers are averaged. 1 when balanced.
#   transformers  olmoe.Output.aux_loss, as transformers computes it: all layers' tokens pooled into one f and p,
#                 and f sums to K rather than 1. K (8 for OLMoE) when balanced.
#   global        the paper's, with f counted over the whole step: every micro-batch of every process (the Qwen
#                 team's global-batch balancing, 2025). The same loss however the batch is split; it keeps each
#                 micro-batch's graph until the step's last forward, so micro-batches save no memory.
# So a coefficient of 0.01 on transformers' value is about K times as strong as the paper's 0.01.


def balance_loss_paper(router_logits, K, all_reduce=False):
    """The paper's load-balancing loss from each layer's router logits (B, T, E): 1 at perfect balance. all_reduce:
    the counts summed over the processes; p stays this process's (the gradients' average over them completes it)."""
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


def routing_load(router_logits, K):
    """Each layer's expert counts (L, E): how many token-expert pairs went to each expert."""
    return torch.stack([torch.bincount(r.flatten(0, 1).topk(K, dim=-1).indices.flatten(), minlength=r.shape[-1])
                        for r in router_logits])


# --------------------------------------------------------------------------------------------------------------
# Learning rate: linear warmup, then cosine down to final_ratio x the peak (OLMoE's schedule)


def get_lr(step, peak, warmup, steps, final_ratio=0.1):
    """The learning rate of optimizer step `step` (1 .. steps)."""
    if step <= warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(1, steps - warmup)  # 0 -> 1
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, tokens, index, seq_len, batch_size, max_tokens, autocast, K):
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
                c = routing_load(out.router_logits, K).cpu()
                counts = c if counts is None else counts + c
        loss = nats / (n * T)
        result[name] = dict(loss=loss, bpb=loss / math.log(2) * (b - a) / v["bytes"])
    return result, counts


def load_summary(counts, K):
    """Per layer: the largest expert's share of the token-expert pairs (1/E when balanced, 1/K when every token
    takes the same K experts) and the entropy of the experts' shares in bits (log2 E when balanced)."""
    share = counts.double() / counts.sum(dim=-1, keepdim=True)  # (L, E)
    entropy = -(share * share.clamp(min=1e-30).log2()).sum(dim=-1)  # (L,)
    return share.max(dim=-1).values.tolist(), entropy.tolist()


# --------------------------------------------------------------------------------------------------------------
# Checkpoints: DIR/step-NNNNNN/ in the Hub's layout, with the training state beside it


def full_state(model, optimizer, fsdp):
    """The model's and the optimizer's whole state on the CPU, keyed by parameter name (every process takes part;
    with FSDP this gathers the shards). The same format whatever the run's parallelism, so any can resume any."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    wrapped = fsdp or isinstance(model, torch.nn.parallel.DistributedDataParallel)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if not optimizer.state:  # before the first step there is none; get_state_dict would take a step to make one
        return (get_model_state_dict(model, options=options) if wrapped else model.state_dict()), None
    if not wrapped:
        return model.state_dict(), _named_optimizer_state(model, optimizer)
    return get_state_dict(model, optimizer, options=options)


def _named_optimizer_state(model, optimizer):
    """optimizer.state_dict() with parameter names for its integer ids, the format get_state_dict writes."""
    sd = optimizer.state_dict()
    names = [n for n, _ in model.named_parameters()]
    return dict(state={names[i]: s for i, s in sd["state"].items()},
                param_groups=[{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]])


def load_optimizer_state(model, optimizer, state, fsdp):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not fsdp and not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        ids = {n: i for i, (n, _) in enumerate(model.named_parameters())}
        optimizer.load_state_dict(dict(state={ids[n]: s for n, s in state["state"].items()},
                                       param_groups=[{**g, "params": [ids[n] for n in g["params"]]}
                                                     for g in state["param_groups"]]))
    else:
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def save_checkpoint(out, step, config, weights, optimizer_state, tokenizer, train_state):
    """Write DIR/step-NNNNNN/ into a temporary folder, then rename it into place: a crash leaves either the whole
    checkpoint or none. The weights are float32, the master weights, so a resumed run continues exactly."""
    final = out / f"step-{step:06d}"
    tmp = out / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with torch.device("meta"):
        model = olmoe.Transformer(config)
    model.load_state_dict(weights, assign=True)
    olmoe.save_model(model, tmp)
    if train_state["args"].get("variant"):  # config.json names it: only variants.load_model reads it
        variants.mark(tmp, train_state["args"]["variant"])
    tokenizer.save(str(tmp / "tokenizer.json"))
    eos, pad = config.eos_token_id, config.pad_token_id
    (tmp / "generation_config.json").write_text(json.dumps(dict(eos_token_id=eos, pad_token_id=pad), indent=2))
    torch.save(dict(train_state, optimizer=optimizer_state), tmp / "train_state.pt")  # what --resume needs
    args = train_state["args"]
    tokens = step * args["batch_size"] * args["seq_len"]  # for routing.py's curves; seq_len for evaluate.py
    (tmp / "trainer_state.json").write_text(json.dumps(dict(step=step, tokens=tokens, seq_len=args["seq_len"],
                                                            args=args)) + "\n")
    if final.exists():  # the same step saved again (a resumed run): replace it only once the new one is whole
        old = out / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    return final


def resumable(out):
    """A run's checkpoints that hold what --resume needs (train_state.pt), the most recently saved last."""
    return sorted((p.parent for p in Path(out).glob("step-*/train_state.pt")),
                  key=lambda p: (p / "train_state.pt").stat().st_mtime)


def prune(out, keep):
    """Only the last `keep` checkpoints saved keep their train_state.pt, whose optimizer state is twice the weights;
    the others keep the weights alone, which is all generate.py, routing.py and evaluate.py read."""
    for checkpoint in resumable(out)[:-keep]:
        (checkpoint / "train_state.pt").unlink()


def find_checkpoint(path):
    """--resume PATH: a step-NNNNNN checkpoint, or a run's directory (its checkpoint saved last)."""
    path = Path(path)
    if (path / "train_state.pt").is_file():
        return path
    if not (steps := resumable(path)):
        kept = resumable(path.parent) if (path / "config.json").is_file() else []
        raise TrainError(f"--resume {path}: " + (f"kept its weights only (--keep-resumable); resume from {kept[-1]}"
                         if kept else "no checkpoint with a train_state.pt there (expected DIR/step-NNNNNN or the "
                         "run's DIR)"))
    return steps[-1]


def config_difference(a, b):
    """The first field in which two model configs differ, as text; None if they are the same model."""
    for field in sorted(set(vars(a)) | set(vars(b)) | {"model_type"}):
        if field not in ("dtype", "router_aux_loss_coef", "router_z_loss_coef") and \
                getattr(a, field, None) != getattr(b, field, None):
            return f"{field} {getattr(a, field, None)} here, {getattr(b, field, None)} in the checkpoint"
    return None


# --------------------------------------------------------------------------------------------------------------
# Speed


def matmul_peak(device, dtype):
    """The device's measured matmul rate in dtype (FLOP/s): the denominator of MFU."""
    n = 1024 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync, times = generate.synchronizer(device), []
    for _ in range(5):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / sorted(times)[2]


def active_params(config):
    """Parameters each training token multiplies: every block's, with K of the E experts, and lm_head (the
    embedding is a lookup). Training does about 6 FLOPs per active parameter per token (forward 2, backward 4)."""
    with torch.device("meta"):
        model = olmoe.Transformer(config)
    n = 0
    for name, p in model.named_parameters():
        if name.startswith("model.layers") or name.startswith("lm_head"):
            n += p.numel() * (config.num_experts_per_tok / config.num_experts if "experts" in name else 1)
    return n


# --------------------------------------------------------------------------------------------------------------
# The training run


def init_weights(model, seed):
    """OLMoE's initialisation: norms 1, every other weight normal(0, 0.02) cut at 3 standard deviations."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                torch.nn.init.trunc_normal_(p, std=0.02, a=-0.06, b=0.06)


def check_args(args):
    """The flags' own limits, before anything runs."""
    for flag in ("steps", "batch_size", "seq_len", "save_every", "vocab_size", "eval_tokens"):
        if getattr(args, flag) < 1:
            raise TrainError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected at least 1")
    if not 0 < args.val_fraction < 1 or args.eval_every < 0:
        raise TrainError(f"need 0 < --val-fraction < 1 and --eval-every >= 0, got {args.val_fraction} and "
                         f"{args.eval_every}")
    if args.model and args.init:
        raise TrainError("--model and --init exclude each other: --model trains a preset from scratch, --init "
                         "continues from a checkpoint")
    if args.model and args.model not in PRESETS and not (args.model.endswith(".json") and Path(args.model).is_file()):
        raise TrainError(f"--model {args.model!r}: unknown preset (expected one of {', '.join(PRESETS)}, "
                         "or a config.json file of your own)")
    if args.upcycle and not args.init:
        raise TrainError("--upcycle E K needs --init: the dense checkpoint (an OLMoE of one expert) to upcycle")
    if args.dtype not in (None, "float32", "bfloat16"):
        raise TrainError(f"--dtype {args.dtype!r}: expected float32 or bfloat16")


@dataclass
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
    step: int  # the optimizer steps the weights hold
    resumed: Path | None  # the checkpoint this run continues, if any

    @property
    def distributed(self):
        return started_by_torchrun()

    @property
    def is_main(self):
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)


def started_by_torchrun():
    """Whether torchrun started this process (it sets RANK, WORLD_SIZE and LOCAL_RANK): then it has peers."""
    return "RANK" in os.environ


@contextlib.contextmanager
def saying(is_main, what):
    """'what ...' on stderr as a phase of the set-up starts, then what it found and how long it took, on the same
    line: a run says what it is doing from its first second. Yields a list; what is appended to it is said too."""
    said, t0 = [], time.perf_counter()
    if is_main:
        print(f"{what} ...", end=" ", file=sys.stderr, flush=True)
    try:
        yield said
    except BaseException:
        if is_main:
            print(file=sys.stderr, flush=True)  # an error starts on a line of its own
        raise
    if is_main:
        print(", ".join(said + [f"{time.perf_counter() - t0:.1f} s"]), file=sys.stderr, flush=True)


def megabytes(docs):
    return sum(len(d.encode("utf-8", errors="replace")) for d in docs) / 1e6


def set_up_processes(args):
    """One process, or as many as torchrun started (RANK, WORLD_SIZE set), each on its own device. Returns rank,
    world, device, micro-batch size and micro-batches per step."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size % world:
        raise TrainError(f"--batch-size {args.batch_size} does not divide over {world} processes")
    micro = args.micro_batch_size or args.batch_size // world
    if (args.batch_size // world) % micro:
        raise TrainError(f"--micro-batch-size {micro} does not divide the {args.batch_size // world} sequences "
                         f"each of the {world} processes takes per step")
    if args.fsdp and not started_by_torchrun():
        raise TrainError("--fsdp shards over processes: start it with torchrun --nproc_per_node N")
    device = generate.pick_device(args.device)
    if started_by_torchrun():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return rank, world, device, micro, args.batch_size // world // micro


def set_up_text(args, out, is_main, distributed):
    """The text, split per domain into training and held-out documents (the held-out ones also written to
    DIR/heldout/NAME.txt, for routing.py or evaluate.py), the tokenizer (the checkpoint's, or one trained on the
    training text) and the model's config."""
    domains = read_domains(args.text)
    splits = {name: split_domain(docs, args.val_fraction) for name, docs in domains.items()}
    for name, (tr, held) in splits.items():
        if not tr or not held:
            raise TrainError(f"--text {name}: too short to hold out --val-fraction {args.val_fraction} of it and "
                             "train on the rest")
    if is_main:
        docs = [d for ds in domains.values() for d in ds]
        print(f"read {len(docs)} files, {megabytes(docs):.2f} MB, in {len(domains)} domains ({', '.join(domains)})",
              file=sys.stderr)
        (out / "heldout").mkdir(parents=True, exist_ok=True)
        for name, (_, held) in splits.items():
            (out / "heldout" / f"{name}.txt").write_text("\n".join(held), encoding="utf-8")
    init = generate.checkpoint_dir(args.init) if args.init else None
    if init:
        return splits, generate.load_tokenizer(init)[0], variants.read_config(init)[0], init
    # Trained on the first process and read by the others. The training is deterministic, so a resumed run
    # trains the very tokenizer its checkpoint holds (checked in set_up).
    if is_main:
        docs = [d for tr, _ in splits.values() for d in tr]
        with saying(is_main, f"training a byte-level BPE tokenizer of {args.vocab_size} tokens on "
                             f"{megabytes(docs):.2f} MB"):
            train_tokenizer(docs, args.vocab_size).save(str(out / "tokenizer.json"))
    if distributed:
        dist.barrier()
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    if args.model and args.model.endswith(".json"):
        config = olmoe.config_from_dict(json.loads(Path(args.model).read_text()))
    else:
        config = PRESETS[args.model or "olmoe-cpu"]()
    config.vocab_size = -(-tokenizer.get_vocab_size() // 64) * 64  # padded to a multiple of 64, as released models
    config.eos_token_id, config.pad_token_id = tokenizer.token_to_id(EOS), tokenizer.token_to_id(PAD)
    config.dtype = "float32"
    return splits, tokenizer, config, None


def set_up_model(args, config, device, world, dtype, checkpoint, upcycle=None):
    """The model in float32 (the master weights: from the checkpoint, upcycled if asked, else initialised), wrapped
    for DDP, or sharded by FSDP2 (bf16 compute, float32 reduction; each block one all-gather), and AdamW on every
    parameter."""
    if checkpoint:
        model = variants.load_model(checkpoint, device="cpu", dtype=torch.float32).train()
        if upcycle:  # a dense model's MLP copied into every expert, a new router (variants.py)
            model = variants.upcycle(model, *upcycle, seed=args.seed).train()
    else:
        model = olmoe.Transformer(config)
        init_weights(model, args.seed)
    if args.variant:  # an architecture no released checkpoint has (variants.py)
        variants.apply(model, args.variant)
    if args.fsdp:  # fully_shard moves each shard to the device itself: the whole model never is on one
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (world,))
        # Our blocks return router logits as a view; nothing modifies a block's outputs in place, as it warns of.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
    else:
        model.to(device)
        if started_by_torchrun():
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                                              else None)
    return model, torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                                    weight_decay=args.weight_decay)


def set_up(args) -> Run:
    """Everything before the first step: processes, text, tokenizer and config, the token file, the model and its
    optimizer, and what --resume restores. Each user error is a TrainError raised before any work is lost."""
    check_args(args)
    rank, world, device, micro, accumulate = set_up_processes(args)
    is_main, distributed = rank == 0, started_by_torchrun()
    # bf16 autocast where the device has native bf16 (CUDA from Ampere on), float32 otherwise unless asked.
    native_bf16 = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
    dtype = getattr(torch, args.dtype or ("bfloat16" if native_bf16 else "float32"))
    out = Path(args.out)
    resume = find_checkpoint(args.resume) if args.resume else None
    if not resume and any(out.glob("step-*")):
        raise TrainError(f"--out {out} already holds checkpoints ({sorted(out.glob('step-*'))[-1].name}): pass "
                         f"--resume {out} to continue that run, or choose another --out")
    splits, tokenizer, config, init = set_up_text(args, out, is_main, distributed)
    if args.upcycle:
        config = variants.upcycle_config(config, *args.upcycle)
    if config.model_type == "olmoe":  # the coefficients trained with, in the convention the config's readers use:
        # transformers' aux loss reads K at balance, the paper's 1, so the paper's lb_coef is lb_coef / K there
        K = config.num_experts_per_tok
        config.router_aux_loss_coef = args.lb_coef if args.lb_convention == "transformers" else args.lb_coef / K
        config.router_z_loss_coef = args.z_coef
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    if eos is None:
        raise TrainError(f"{init}: the config has no eos_token_id to separate documents with")
    if args.seq_len > config.max_position_embeddings:
        raise TrainError(f"--seq-len {args.seq_len} is beyond the model's context of "
                         f"{config.max_position_embeddings} tokens")
    if resume and (diff := config_difference(config, variants.read_config(resume)[0])):
        raise TrainError(f"--resume {resume}: another model config ({diff})")
    if resume and generate.load_tokenizer(resume)[0].to_str() != tokenizer.to_str():
        raise TrainError(f"--resume {resume}: another tokenizer than this run's (the checkpoint's "
                         "tokenizer.json differs: same --text, --vocab-size and --init?)")
    out.mkdir(parents=True, exist_ok=True)
    if is_main:  # the token file, made once by the first process
        text = [d for tr, va in splits.values() for d in tr + va]
        with saying(is_main, f"tokenizing {megabytes(text):.2f} MB into {out / 'tokens.bin'}") as said:
            said.append(f"{build_token_file(out, tokenizer, eos, splits)['train'][1]:,} training tokens")
    if distributed:
        dist.barrier()
    index = json.loads((out / "tokens.json").read_text())
    tokens = np.memmap(out / "tokens.bin", dtype=index["dtype"], mode="r")
    if index["train"][1] <= args.seq_len:
        raise TrainError(f"only {index['train'][1]} training tokens: too few for one window of --seq-len "
                         f"{args.seq_len}")
    with saying(is_main, f"loading {resume or init}" if resume or init else "initialising the model"):
        model, optimizer = set_up_model(args, config, device, world, dtype, resume or init,
                                        upcycle=None if resume else args.upcycle)
    run = Run(args, out, rank, world, device, dtype, micro, accumulate, list(splits), tokenizer, config, tokens,
              index, init, model, optimizer, 0, resume)
    if resume:
        restore(run, resume)
    return run


def restore(run, checkpoint):
    """--resume: the optimizer's state, the step and the random state the checkpoint was saved with."""
    state = torch.load(checkpoint / "train_state.pt", map_location="cpu", weights_only=True)
    if state["optimizer"] is not None:  # None: the untrained model's checkpoint, step 0
        load_optimizer_state(run.model, run.optimizer, state["optimizer"], run.args.fsdp)
    run.step = state["step"]
    torch.set_rng_state(state["rng"])
    log = run.out / "log.jsonl"
    if run.is_main and log.is_file():  # a run killed after its last checkpoint logged steps it will now redo
        kept = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= run.step]
        log.write_text("".join(line + "\n" for line in kept))


def raw_model(run):
    """The model itself, unwrapped from DDP (FSDP2 shards it in place)."""
    return run.model.module if isinstance(run.model, torch.nn.parallel.DistributedDataParallel) else run.model


def forward_backward(run, step):
    """The gradients of one optimizer step: this process's share of the step's windows, in micro-batches whose
    gradients add up (reduced over the processes once, after the last). Returns the step's mean cross-entropy,
    load-balancing loss and z-loss over all processes."""
    args, share = run.args, run.args.batch_size // run.world
    x, y = get_batch(run.tokens, run.index["train"][1], args.seq_len, args.batch_size, args.seed, step)  # (B, T)
    x, y = x[run.rank * share:(run.rank + 1) * share], y[run.rank * share:(run.rank + 1) * share]
    sums = torch.zeros(3, device=run.device)  # cross-entropy, load balancing, z-loss: means over micro-batches
    kept, router_logits = 0.0, []  # global: the step's loss and router logits until its last forward
    for i in range(run.accumulate):
        last = i == run.accumulate - 1
        if args.fsdp:
            run.model.set_requires_gradient_sync(last)
        elif run.distributed:
            run.model.require_backward_grad_sync = last
        xb, yb = x[i * run.micro:(i + 1) * run.micro].to(run.device), y[i * run.micro:(i + 1) * run.micro]
        with run.autocast():
            output = run.model(xb)
        ce = F.cross_entropy(output.logits.flatten(0, 1).float(), yb.to(run.device).flatten())
        lb = z = torch.zeros((), device=run.device)
        if run.config.model_type == "olmoe":
            K, z = run.config.num_experts_per_tok, output.z_loss
            if args.lb_convention == "paper":
                lb = balance_loss_paper(output.router_logits, K)
            elif args.lb_convention == "transformers":
                lb = output.aux_loss
            else:  # global: the load-balancing term waits for the step's last micro-batch
                router_logits.append(output.router_logits)
        loss = (ce + args.lb_coef * lb + args.z_coef * z) / run.accumulate
        if router_logits:
            kept = kept + loss
        else:
            loss.backward()
        sums += torch.stack([ce.detach(), lb.detach(), z.detach()]) / run.accumulate
    if router_logits:  # global: each layer's logits of every micro-batch together, counted over every process
        lb = balance_loss_paper([torch.cat(ls) for ls in zip(*router_logits)], K, all_reduce=run.distributed)
        (kept + args.lb_coef * lb).backward()
        sums[1] = lb.detach()
    if run.distributed:
        dist.all_reduce(sums)
        sums /= run.world
    return sums.tolist()


def log_evaluation(run, step, train_loss, extra):
    """Validation loss and bits per byte of each domain, and the experts' load: one line of log.jsonl and stdout."""
    args, K = run.args, getattr(run.config, "num_experts_per_tok", 0)
    run.model.eval()
    eval_model = run.model if args.fsdp else raw_model(run)  # FSDP needs every process; DDP's wrapper is for training
    val, counts = evaluate(eval_model, run.tokens, run.index, args.seq_len, run.micro, args.eval_tokens, run.autocast,
                           K)
    run.model.train()
    warmup = warmup_steps(args)
    record = dict(step=step, tokens=step * args.batch_size * args.seq_len, train_loss=train_loss, **extra,
                  lr=get_lr(max(step, 1), args.lr, warmup, args.steps),
                  val={d: v["loss"] for d, v in val.items()}, val_bpb={d: v["bpb"] for d, v in val.items()})
    if counts is not None:
        record["max_share"], record["entropy_bits"] = load_summary(counts, K)
    if run.is_main:
        with open(run.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        trained = f"train {train_loss:.3f} | " if train_loss is not None else ""
        line = (f"step {step} | {record['tokens']} tokens | {trained}val "
                + ", ".join(f"{d} {v['loss']:.3f} ({v['bpb']:.3f} bpb)" for d, v in val.items()))
        if counts is not None:
            line += " | largest expert share per layer " + " ".join(f"{s:.3f}" for s in record["max_share"])
        tqdm.write(line, file=sys.stdout)


def save(run, step):
    """DIR/step-NNNNNN: the weights and the optimizer's state gathered whole (every process takes part), written
    by the first process."""
    weights, opt_state = full_state(run.model, run.optimizer, run.args.fsdp)
    if run.is_main:
        train_state = dict(step=step, rng=torch.get_rng_state(), args=vars(run.args), world_size=run.world)
        save_checkpoint(run.out, step, run.config, weights, opt_state, run.tokenizer, train_state)
        prune(run.out, run.args.keep_resumable)
    if run.distributed:
        dist.barrier()
    return run.out / f"step-{step:06d}"


def warmup_steps(args):
    return args.warmup_steps if args.warmup_steps is not None else min(2000, args.steps // 10)


def describe(run):
    """The line a run starts with: the model, the data, the processes and the batch."""
    c, n = run.config, sum(p.numel() for p in raw_model(run).parameters())
    return (f"{c.model_type} {n / 1e6:.2f}M parameters ({active_params(c) / 1e6:.2f}M active), "
            f"{run.index['train'][1]} training tokens, {run.world} process(es) on {run.device.type}, "
            f"{str(run.dtype).removeprefix('torch.')}; {run.args.batch_size} x {run.args.seq_len} tokens per step "
            f"({run.accumulate} micro-batch(es) of {run.micro} per process)")


def finish(run):
    """The curves of the run, and (several processes) leaving together."""
    c = run.config
    if run.is_main and (run.out / "log.jsonl").is_file():
        what = f"{c.model_type}, {sum(p.numel() for p in raw_model(run).parameters()) / 1e6:.1f}M parameters" + (
            f" ({c.num_experts} experts, {c.num_experts_per_tok} per token)" if c.model_type == "olmoe" else "")
        origin = (f"upcycled from {run.args.init}" if run.args.upcycle else f"fine-tuned from {run.args.init}"
                  if run.init else "from scratch")
        plot(run.out / "log.jsonl", run.out / "curves.png", f"run {run.out.name}: {what}, {origin}, on "
             f"{', '.join(run.domains)}", balanced=1 / c.num_experts if c.model_type == "olmoe" else None)
    if run.distributed:
        # All ranks leave together. FSDP2's DTensor caches keep the gloo process group alive past
        # destroy_process_group, into interpreter shutdown; a rank that got there while rank 0 was still plotting
        # aborted there ("terminate called without an active exception") in 6 of 324 runs of the two-process
        # test under load, and in none of 220 with this barrier.
        dist.barrier()
        dist.destroy_process_group()


ETA_AFTER = 10
NO_ETA = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


def train(args):
    run = set_up(args)
    step, tokens_per_step = run.step, args.batch_size * args.seq_len
    train_s = 0.0  # seconds of training steps in this process, evaluation and saving not counted
    flops_per_step = 6 * active_params(run.config) * tokens_per_step
    peak = matmul_peak(run.device, run.dtype) * run.world
    sync = generate.synchronizer(run.device)
    if run.is_main:
        print(describe(run), file=sys.stderr)
    if step == 0 and args.eval_every:
        if run.is_main:
            print(f"evaluating the untrained model on {args.eval_tokens} held-out tokens of each domain",
                  file=sys.stderr)
        log_evaluation(run, 0, None, {})
    last_saved, done = run.resumed, step  # done: the last step whose update the weights hold
    if step == 0 and (not run.init or args.upcycle):  # the untrained (or just upcycled) model, to compare with
        with saying(run.is_main, f"saving the {'upcycled' if args.upcycle else 'untrained'} model as "
                                 f"{run.out / 'step-000000'}"):
            last_saved = save(run, 0)
    # The bar starts after the untrained model's evaluation, and shows the time left only once ETA_AFTER steps have
    # timed a step: one step's time says little of 1500.
    bar = tqdm(total=args.steps, initial=step, desc="training", unit="step", file=sys.stderr,
               disable=not run.is_main, dynamic_ncols=True, bar_format=NO_ETA)
    # Ctrl-C finishes the step under way, saves it and exits. The handler only raises a flag, so that a second
    # SIGINT cannot break into the saving: a terminal's Ctrl-C reaches torchrun's workers twice, once directly
    # and once forwarded by torchrun.
    interrupted = []
    previous_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    try:
        while step < args.steps:
            step += 1
            t0 = time.perf_counter()
            # determine and set the learning rate for this iteration
            for group in run.optimizer.param_groups:
                group["lr"] = get_lr(step, args.lr, warmup_steps(args), args.steps)
            # forward backward, with gradient accumulation over micro-batches; stop before a non-finite update
            ce, lb, z = forward_backward(run, step)
            if not math.isfinite(ce + lb + z):
                bar.close()
                kept = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was saved yet"
                raise TrainError(f"the loss became {ce + lb + z} at step {step}; stopped before updating the "
                                 f"weights, and {kept}. Lower --lr or raise --warmup-steps (in bfloat16, try float32)")
            # clip the gradient, update the weights
            grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            done = step
            sync()
            dt = time.perf_counter() - t0
            train_s += dt
            if step - run.step == ETA_AFTER:
                bar.bar_format = None  # tqdm's own format, with the time left
            bar.update(1)
            bar.set_postfix(loss=f"{ce:.3f}", tok_s=f"{tokens_per_step / dt:.0f}",
                            mfu=f"{flops_per_step / dt / peak:.1%}")
            # evaluate, log and save
            if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
                grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP
                log_evaluation(run, step, ce, dict(lb_loss=lb, z_loss=z, grad_norm=grad_norm.item(), train_s=train_s,
                                                   tokens_per_s=tokens_per_step / dt, mfu=flops_per_step / dt / peak))
            if step % args.save_every == 0 or step == args.steps:
                last_saved = save(run, step)
            stop = torch.tensor(float(bool(interrupted)), device=run.device)
            if run.distributed:  # every process stops at the same step, whichever saw the Ctrl-C
                dist.all_reduce(stop, op=dist.ReduceOp.MAX)
            if stop.item():
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        # Ctrl-C: keep what was trained. A step interrupted before optimizer.step() (a KeyboardInterrupt raised
        # before the handler was in place) left the weights as the step before it had them.
        bar.close()
        if done and last_saved != run.out / f"step-{done:06d}":
            if run.is_main:
                print(f"\ninterrupted: saving step {done}", file=sys.stderr)
            run.optimizer.zero_grad(set_to_none=True)
            save(run, done)
        raise
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    bar.close()
    finish(run)
    return last_saved


def plot(log_file, png, title, balanced=None):
    """The run's curves from log.jsonl: losses over tokens, and (OLMoE) each layer's largest expert share."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    moe = "max_share" in records[-1]
    fig, axes = plt.subplots(1, 2 if moe else 1, figsize=(12 if moe else 6, 4.5), squeeze=False)
    ax = axes[0, 0]
    trained = [r for r in records if r["train_loss"] is not None]
    ax.plot([r["tokens"] for r in trained], [r["train_loss"] for r in trained], label="train (one batch)")
    for d in records[-1]["val"]:
        ax.plot([r["tokens"] for r in records], [r["val"][d] for r in records], marker=".", label=f"validation: {d}")
    ax.set(xlabel="tokens trained", ylabel="cross-entropy (nats per token)", title="loss")
    ax.legend()
    if moe:
        ax = axes[0, 1]
        for layer in range(len(records[-1]["max_share"])):
            ax.plot([r["tokens"] for r in records], [r["max_share"][layer] for r in records], label=f"layer {layer}")
        ax.axhline(balanced, color="gray", linestyle="--", label="perfect balance (1/E)")
        ax.set(xlabel="tokens trained", ylabel="largest expert's share of token-expert pairs",
               title="expert load on the validation text")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def plot_runs(runs, png):
    """Several runs side by side, from their log.jsonl (e.g. an ablation of --lb-coef): mean validation loss over
    the domains, and each run's largest expert share and routing entropy, the mean over layers with the range
    from the most to the least balanced layer shaded."""
    try:
        import matplotlib
    except ImportError:
        raise TrainError("--compare-runs draws with matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), layout="constrained")
    E = None
    for run, color in zip(runs, plt.get_cmap("tab10").colors):
        log_file = Path(run) / "log.jsonl"
        if not log_file.is_file():
            raise TrainError(f"--compare-runs {run}: no log.jsonl there (expected a train.py --out directory)")
        records = [json.loads(line) for line in log_file.read_text().splitlines()]
        E = json.loads(next(Path(run).glob("step-*/config.json")).read_text())["num_experts"]
        x = [r["tokens"] for r in records]
        axes[0].plot(x, [sum(r["val"].values()) / len(r["val"]) for r in records], color=color, label=Path(run).name)
        for ax, key in zip(axes[1:], ("max_share", "entropy_bits")):
            values = torch.tensor([r[key] for r in records])  # (evaluations, L)
            ax.plot(x, values.mean(1), color=color, label=f"{Path(run).name}: mean over layers")
            ax.fill_between(x, values.min(1).values, values.max(1).values, color=color, alpha=0.2)
    axes[0].set(xlabel="tokens trained", ylabel="validation cross-entropy (nats per token),\nmean over the domains",
                title="validation loss")
    axes[1].axhline(1 / E, color="gray", linestyle="--", label="perfect balance, 1/E")
    axes[1].set(xlabel="tokens trained", ylabel="largest expert's share of token-expert pairs", yscale="log",
                title="expert load (shaded: range over layers)")
    axes[2].axhline(math.log2(E), color="gray", linestyle="--", label="perfect balance, log2 E")
    axes[2].set(xlabel="tokens trained", ylabel="entropy of the experts' shares (bits)",
                title="routing entropy (shaded: range over layers)")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(f"{len(runs)} train.py runs on their validation text: {', '.join(Path(r).name for r in runs)}")
    fig.savefig(png, dpi=100)
    plt.close(fig)


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
    if not args.resume or args.compare_runs:
        if not args.out:
            raise TrainError("--out DIR: where to write the run (or --resume DIR to continue one)")
        return args
    checkpoint = find_checkpoint(args.resume)
    args.out = args.out or str(checkpoint.parent)
    saved = json.loads((checkpoint / "trainer_state.json").read_text()).get("args")
    if saved is None:  # a checkpoint of an older train.py: it saved no flags
        return args
    only_given = parser()
    only_given.set_defaults(**dict.fromkeys(vars(args)))  # every default None: a value that is not was given
    given = {name: value for name, value in vars(only_given.parse_args(argv)).items() if value is not None}
    for name, value in given.items():
        if name not in MAY_CHANGE and value != saved.get(name):
            flag, may = "--" + name.replace("_", "-"), ", ".join("--" + f.replace("_", "-") for f in MAY_CHANGE[2:])
            raise TrainError(f"{flag} {value} differs from the run's {flag} {saved.get(name)} ({checkpoint}): a "
                             f"resumed run keeps its flags; only {may} may change")
    return argparse.Namespace(**{**vars(args), **saved, **given, "out": args.out})


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.compare_runs:
            return plot_runs(args.compare_runs, args.out)
        if not args.text:
            raise TrainError("--text NAME=FILE_OR_GLOB: give at least one text to train on")
        train(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except (TrainError, ValueError, OSError) as e:  # olmoe.CheckpointError is a ValueError
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}".splitlines()[0], file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
