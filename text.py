"""Text in, tokens out: the --text NAME=FILE arguments every command takes, and what train.py makes of its text
(domains split into training and held-out documents, a byte-level BPE tokenizer trained on them, a token file).

    texts = text.read_texts(["prose=README.md"])              # evaluate.py, routing.py, benchmark.py bpb
    tokenizer = text.train_tokenizer(docs, vocab_size=4096)   # train.py from scratch; the tests' tokenizers too
"""

import glob
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

import cli

EOS, PAD = "<|endoftext|>", "<|padding|>"  # the special tokens of a tokenizer trained here: ids 0 and 1


def parse_spec(spec, value="FILE"):
    """One --text argument, NAME=VALUE -> (name, value)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        example = "code='src/*.py'" if "GLOB" in value else "code=olmoe.py"
        raise ValueError(f"--text {spec!r}: expected NAME={value}, e.g. {example}")
    return name, rest


def read_texts(specs) -> dict:
    """--text NAME=FILE arguments, each one UTF-8 text file -> {name: its text}."""
    texts = {}
    for spec in specs:
        name, file = parse_spec(spec)
        if name in texts:
            raise ValueError(f"--text {spec!r}: the name {name!r} is given twice")
        try:
            texts[name] = Path(file).read_text(encoding="utf-8")
        except (FileNotFoundError, IsADirectoryError):
            raise ValueError(f"--text {spec!r}: {file}: no such file") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"--text {spec!r}: {file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not texts[name]:
            raise ValueError(f"--text {spec!r}: {file}: empty")
    return texts


def read_domains(specs) -> dict:
    """train.py's --text NAME=FILE_OR_GLOB, repeated -> {name: [each file's text, in sorted order]}; a name given
    twice gathers both."""
    domains = {}
    for spec in specs:
        name, pattern = parse_spec(spec, "FILE_OR_GLOB")
        files = sorted(glob.glob(os.path.expanduser(pattern), recursive=True)) or [pattern]
        files = [f for f in files if not os.path.isdir(f)]
        if not files or not os.path.isfile(files[0]):
            raise ValueError(f"--text {spec}: no such file")
        texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
        if not any(t.strip() for t in texts):
            raise ValueError(f"--text {spec}: empty (no text in {len(files)} file(s))")
        domains.setdefault(name, []).extend(t for t in texts if t.strip())
    return domains


def read_splits(specs, val_fraction, say=True):
    """train.py's --text arguments -> {name: (training docs, held-out docs)}, each domain split by split_domain;
    say: one line on stderr of what was read."""
    domains = read_domains(specs)
    splits = {name: split_domain(docs, val_fraction) for name, docs in domains.items()}
    for name, (tr, held) in splits.items():
        if not tr or not held:
            raise ValueError(f"--text {name}: too short to hold out --val-fraction {val_fraction} of it and train on "
                             "the rest")
    if say:
        docs = [d for ds in domains.values() for d in ds]
        print(f"read {len(docs)} files, {megabytes(docs):.2f} MB, in {len(domains)} domains ({', '.join(domains)})",
              file=sys.stderr)
    return splits


def megabytes(docs):
    return sum(len(d.encode("utf-8", errors="replace")) for d in docs) / 1e6


def split_domain(docs, val_fraction):
    """A domain's documents -> (train docs, validation docs): the last val_fraction of its characters, whole
    documents from the end, and the one that reaches past that point cut at a line (a single file is cut too)."""
    need, k = val_fraction * sum(len(d) for d in docs), len(docs)
    while k > 1 and need >= len(docs[k - 1]):
        k, need = k - 1, need - len(docs[k - 1])
    d = docs[k - 1]
    cut = d.rfind("\n", 0, len(d) - int(need)) + 1 or len(d) - int(need)
    return [t for t in docs[:k - 1] + [d[:cut]] if t], [h for h in [d[cut:]] + docs[k:] if h]


def train_tokenizer(docs, vocab_size, special_tokens=(EOS, PAD)):
    """A byte-level BPE tokenizer (GPT-2's kind, as OLMoE's) trained on docs, its special tokens first (ids 0, 1,
    ...): every byte sequence has a tokenization, and multi-byte characters may span several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
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


def open_token_file(out):
    """build_token_file's tokens, memory-mapped, and its index."""
    index = json.loads((out / "tokens.json").read_text())
    return np.memmap(out / "tokens.bin", dtype=index["dtype"], mode="r"), index


# --------------------------------------------------------------------------------------------------------------
# A training run's text, in its directory: made by the first process, read by every one (barrier: wait for it)


def prepare(out, specs, *, val_fraction, vocab_size, tokenizer=None, is_main=True, barrier=lambda: None):
    """(splits, tokenizer) of a run in out: each domain split (read_splits), its held-out text written to
    out/heldout/NAME.txt for routing.py and evaluate.py, and the tokenizer given (a checkpoint's), or one trained
    on the training text into out/tokenizer.json. The training is deterministic, so a resumed run trains the very
    tokenizer its checkpoint holds."""
    splits = read_splits(specs, val_fraction, say=is_main)
    if is_main:
        (out / "heldout").mkdir(parents=True, exist_ok=True)
        for name, (_, held) in splits.items():
            (out / "heldout" / f"{name}.txt").write_text("\n".join(held), encoding="utf-8")
    if tokenizer is not None:
        return splits, tokenizer
    if is_main:
        docs = [d for tr, _ in splits.values() for d in tr]
        with cli.saying(is_main, f"training a byte-level BPE tokenizer of {vocab_size} tokens on "
                                 f"{megabytes(docs):.2f} MB"):
            train_tokenizer(docs, vocab_size).save(str(out / "tokenizer.json"))
    barrier()
    from tokenizers import Tokenizer

    return splits, Tokenizer.from_file(str(out / "tokenizer.json"))


def prepare_tokens(out, tokenizer, eos, splits, *, is_main=True, barrier=lambda: None):
    """The run's token file (build_token_file), made by the first process, memory-mapped: (tokens, index)."""
    out.mkdir(parents=True, exist_ok=True)
    if is_main:
        docs = [d for tr, va in splits.values() for d in tr + va]
        with cli.saying(is_main, f"tokenizing {megabytes(docs):.2f} MB into {out / 'tokens.bin'}") as said:
            said.append(f"{build_token_file(out, tokenizer, eos, splits)['train'][1]:,} training tokens")
    barrier()
    return open_token_file(out)
