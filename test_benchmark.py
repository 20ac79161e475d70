"""Tests for benchmark.py: the self-check a user runs on their GPU, here on the CPU, and every other subcommand on
tiny models, through benchmark.main. Each measures time, so what a test can hold it to is consistency: a row per
requested configuration, each ratio and fraction the one its own numbers give, each bound the formula's, and each
accuracy figure the one computed here from its definition. The measured ceilings (a 256 MB copy, a 1024^3 matmul)
are replaced by fixed numbers, and torch.compile by the eager function, which takes seconds a test cannot spend
(the compiled paths are tested in test_generate.py and test_quantize.py); llama.cpp, which needs a build, gives
given rates (llama_cpp.py has its own tests)."""

import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import benchmark
import evaluate
import fast
import generate
import llama_cpp
import olmoe
import quantize
from conftest import gen_checkpoint


def test_self_check_passes_on_this_device():
    results = benchmark.check_paths(torch.device("cpu"), models=("OLMoE",), batches=(8,))
    assert len(results) == 3 + 3 * len(fast.MOE_PATHS)
    assert [what for what, ok, _ in results if not ok] == []


def test_self_checks_float32_row_fails_when_the_moe_path_this_device_takes_is_wrong(monkeypatch):
    """The float32 row compares this device's model with the CPU's naive dispatch, not with itself: on a CPU the
    two were once the same model, and a wrong MoE path passed as exact."""
    path = fast.moe_path(*fast.device_facts(torch.device("cpu")), torch.float32, False, 2 * 64, 8, 64)
    right = fast.MOE_PATHS[path]
    monkeypatch.setitem(fast.MOE_PATHS, path, lambda *args: right(*args) + 1e-2)
    results = {what: (ok, detail) for what, ok, detail in
               benchmark.check_paths(torch.device("cpu"), models=("OLMoE",), batches=())}
    ok, detail = next(v for what, v in results.items() if "float32 logits" in what)
    assert not ok, detail
    assert float(detail.removeprefix("max |error| ")) > 1e-4


# --------------------------------------------------------------------------------------------------------------
# Helpers: a tiny shape, fixed ceilings, no compiling, and the markdown tables read back


TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
            num_experts=8, num_experts_per_tok=2, max_position_embeddings=128, eos_token_id=0, pad_token_id=1)
BANDWIDTH, FLOPS = 1e9, 1.0  # a matmul peak of 1 FLOP/s prints a fraction of it with many digits


@pytest.fixture
def tiny(monkeypatch):
    """The tiny shape as --shape tiny, the ceilings fixed, compiling off, and the thread count restored after
    --threads (benchmark.main sets it for the process)."""
    monkeypatch.setitem(benchmark.SHAPES, "tiny", lambda: olmoe.OlmoeConfig(**TINY))
    monkeypatch.setattr(benchmark, "device_ceilings", lambda device, dtype: (BANDWIDTH, FLOPS))
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kw: fn if fn is not None else (lambda f: f))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def rows_of(text):
    """The body rows of the markdown tables in text, as lists of cell strings (header and rule rows left out)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    headers = {i - 1 for i, line in enumerate(lines) if line.startswith("|---")}
    return [[c.strip() for c in line.strip("|").split("|")] for i, line in enumerate(lines)
            if i not in headers and not line.startswith("|---")]


def number(cell):
    """The first number in a cell: '1.54x' -> 1.54, '7% of 19338' -> 7.0, '6211 tok/s' -> 6211.0."""
    return float(re.search(r"[-+]?\d+(\.\d+)?", cell).group())


def close(printed, exact, decimals):
    """printed, a number rounded to `decimals` places, is exact rounded (with a little slack for the rounding of
    the numbers exact was computed from)."""
    return abs(printed - exact) <= 0.5 * 10**-decimals + 1e-3 * abs(exact)


def active_params(c):
    """Parameters one token multiplies in OLMoE's blocks, from the architecture: attention's four projections,
    the q/k norms and the two block norms, the router, and K of the E SwiGLU experts (three D x I matrices)."""
    D, H, Hkv, Dh = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    attention = D * H * Dh + 2 * D * Hkv * Dh + H * Dh * D + H * Dh + Hkv * Dh
    return c.num_hidden_layers * (attention + 2 * D + c.num_experts * D + 3 * c.num_experts_per_tok * D *
                                  c.intermediate_size)


def ratio_of_printed(ratio, a, b, decimals):
    """ratio, printed to 2 places, is the ratio of the numbers a and b show rounded to `decimals` places."""
    h = 0.5 * 10**-decimals
    return (a - h) / (b + h) - 0.005 <= ratio <= (a + h) / (b - h) + 0.005


# --------------------------------------------------------------------------------------------------------------
# speed and train: against transformers on the same weights


def test_speed_prints_a_row_per_batch_and_mode_each_consistent_with_its_own_runs(tiny, monkeypatch, capsys):
    """Each decode row's tok/s is the median of the three timed generate() runs (after a warm-up), its bound the
    copy bandwidth over the bytes a step reads, times the batch; the prefill's fraction of the matmul peak is its
    FLOPs (2 per active parameter per token, and causal attention's) over its time."""
    runs = []
    real = generate.generate

    def recording(*args, stats=None, **kw):
        out = real(*args, stats=stats, **kw)
        if stats is not None:
            runs.append(dict(stats, B=len(args[1]), compile=kw.get("compile")))
        return out

    monkeypatch.setattr(generate, "generate", recording)
    # transformers' rate is the time of `steps` tokens less that of one: 12 steps keep the difference well above a
    # busy machine's jitter at this tiny size (3 once gave a negative one)
    benchmark.main(["speed", "--shape", "tiny", "--device", "cpu", "--batch", "1", "2", "--steps", "12",
                    "--prompt-len", "8"])
    rows = rows_of(capsys.readouterr().out)
    assert [r[0] for r in rows] == ["decode tok/s, batch 1, eager", "decode tok/s, batch 1, compiled",
                                    "decode tok/s, batch 2, eager", "decode tok/s, batch 2, compiled",
                                    "prefill tok/s, 8 tokens"]
    assert len(runs) == 4 * 4  # a warm-up and three timed runs for each decode row
    for i, row in enumerate(rows[:4]):
        ours, hf, ratio = number(row[1]), number(row[2]), number(row[3])
        timed = runs[4 * i + 1:4 * i + 4]
        assert {(r["B"], r["compile"]) for r in timed} == {(1 + i // 2, i % 2 == 1)}
        assert all(r["decode_tokens"] == r["B"] * (12 - 1) for r in timed)  # the tokens after the first
        median = sorted(r["decode_tokens"] / r["decode_s"] for r in timed)[1]
        assert close(ours, median, 1) and hf > 0 and ratio_of_printed(ratio, ours, hf, 1)
        fraction, bound = map(float, re.match(r"(\d+)% of (\d+) ", row[4]).groups())
        step_bytes = next(r["step_bytes"] for r in timed if r["decode_tokens"] / r["decode_s"] == median)
        assert close(bound, BANDWIDTH / step_bytes * timed[0]["B"], 0) and close(fraction, 100 * ours / bound, 0)
    prefill = rows[4]
    ours, hf, ratio, fraction = (number(c) for c in prefill[1:])
    config = olmoe.OlmoeConfig(**TINY)
    flops = 2 * 8 * active_params(config) + 2 * config.num_hidden_layers * 8**2 * config.num_attention_heads * \
        config.head_dim
    assert ratio_of_printed(ratio, ours, hf, 0)
    per_tok_s = 100 * flops / 8 / FLOPS  # the fraction per prefill tok/s; ours is printed to 0.5 tok/s
    assert fraction == pytest.approx(per_tok_s * ours, rel=1e-3, abs=0.5 * per_tok_s)


def test_train_prints_one_step_against_transformers_with_its_mfu(tiny, capsys):
    """tok/s of each side, their ratio, and the model FLOPs utilization: 6 FLOPs per active parameter (the
    blocks' with K of E experts, and lm_head's at every position) per token, over the step's time and the peak."""
    benchmark.main(["train", "--shape", "tiny", "--device", "cpu", "--batch", "2", "--seq-len", "8"])
    [row] = rows_of(capsys.readouterr().out)
    assert row[0] == "training step (forward + backward + AdamW), 2 x 8 tokens, float32"
    ours, hf, ratio, mfu = (number(c) for c in row[1:])
    assert ours > 0 and hf > 0 and ratio_of_printed(ratio, ours, hf, 0)
    config = olmoe.OlmoeConfig(**TINY)
    per_token = 6 * (active_params(config) + config.vocab_size * config.hidden_size)
    per_tok_s = 100 * per_token / FLOPS  # the MFU per tok/s; ours is printed to 0.5 tok/s
    assert mfu == pytest.approx(per_tok_s * ours, rel=1e-3, abs=0.5 * per_tok_s)


# --------------------------------------------------------------------------------------------------------------
# quantized and cpu: decode speed of bf16 / int8 / int4 (cpu: beside llama.cpp, in fresh processes)


QUANT_TINY = dict(TINY, hidden_size=64, intermediate_size=32)  # multiples of --group-size 32, outputs of 16


@pytest.fixture(scope="module")
def quant_checkpoint(tmp_path_factory):
    """A random bf16 checkpoint written as the subcommands write theirs, of a shape they would not choose."""
    path = tmp_path_factory.mktemp("quantized") / "olmoe-1-layers"
    benchmark.write_random_checkpoint(olmoe.OlmoeConfig(**QUANT_TINY), path)
    return path


def test_quantized_prints_each_precision_at_each_batch_against_bf16(tiny, quant_checkpoint, monkeypatch, capsys):
    loaded = []
    real = quantize.load_model
    monkeypatch.setattr(quantize, "load_model", lambda *a, **kw: loaded.append(real(*a, **kw)) or loaded[-1])
    benchmark.main(["quantized", str(quant_checkpoint), "--batch", "1", "2", "--steps", "3", "--group-size", "32",
                    "--threads", "1"])
    out = capsys.readouterr().out
    assert "int4 group size 32" in out and "1 layers" in out
    groups = {m.group_size for model in loaded for m in model.modules() if isinstance(m, quantize.Quantized)}
    assert [(m.model.layers[0].mlp.experts.bits, m.model.layers[0].mlp.experts.dynamic) for m in loaded] == \
        [(8, False), (8, True), (4, False)] and groups == {32}  # --group-size reached them
    rows = rows_of(out)
    assert [r[0] for r in rows] == ["bf16", "bf16 compiled", "int8", "int8 compiled", "int8-dynamic",
                                    "int8-dynamic compiled", "int4", "int4 compiled", "transformers bf16"]
    rate = {(r[0], B): number(r[1 + 2 * i]) for r in rows for i, B in enumerate((1, 2))}
    for r in rows:
        base = "bf16 compiled" if r[0].endswith("compiled") else "bf16"
        for i, B in enumerate((1, 2)):
            assert rate[r[0], B] > 0 and close(number(r[2 + 2 * i]), rate[r[0], B] / rate[base, B], 2)
    assert rows[0][2] == rows[0][4] == "1.00x"


def test_the_cpu_check_fails_where_a_quantized_precision_decodes_slower_than_bf16(monkeypatch):
    """check's speed rows on a CPU: quantized() gives int4 compiled below bf16 compiled, so its row fails; the
    others pass, each with its ratio."""
    rates = {("bf16 compiled", 1): 50.0, ("int8 compiled", 1): 65.0, ("int8-dynamic compiled", 1): 50.0,
             ("int4 compiled", 1): 48.0}
    asked = []
    monkeypatch.setattr(benchmark, "quantized", lambda path, **kw: asked.append(kw) or rates)
    results = benchmark.quantized_speed_check()
    assert asked == [dict(batches=(1,), steps=32, transformers=False)]
    assert [(what.split()[0], ok, detail) for what, ok, detail in results] == [
        ("int8", True, "1.30x bf16"), ("int8-dynamic", True, "1.00x bf16"), ("int4", False, "0.96x bf16")]


def test_rows_times_each_products_row_and_its_weights_bytes_a_second(tiny, capsys):
    """rows: a row per product a CPU rule picks from (each checked against its kernel in test_quantize.py), its GB/s
    the bytes of one weight over its time."""
    benchmark.main(["rows", "--shape", "32", "256", "--copies", "2", "--threads", "1"])
    rows = rows_of(capsys.readouterr().out)
    assert [r[0] for r in rows] == ["bf16 F.linear", "bf16 gemv", "int8 _weight_int8pack_mm",
                                    "int8 reduction over bytes", "int8 reduction over int32 words",
                                    "int8 cast, F.linear", "int4 _weight_int4pack_mm_for_cpu"]
    benchmark.main(["rows", "--shape", "32", "256", "--rows", "16", "--eager", "--copies", "2", "--threads", "1"])
    out = capsys.readouterr().out
    assert out.startswith("16 rows by (32, 256), eager") and [r[0] for r in rows_of(out)] == [
        "bf16 F.linear", "int8 _weight_int8pack_mm", "int8 cast, F.linear", "int4 _weight_int4pack_mm_for_cpu"]
    rows += rows_of(out)
    nbytes = {"bf16": 32 * 256 * 2, "int8": 32 * 256, "int4": 32 * 256 // 2}
    for r in rows:  # us printed whole, GB/s to 0.1: slack for both roundings
        us, exact = number(r[1]), nbytes[r[0].split()[0]] / (number(r[1]) * 1e-6) / 1e9
        assert us > 0 and abs(number(r[2]) - exact) <= 0.05 + exact * 0.6 / us, r


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_cpu_one_prints_the_weights_bytes_memory_and_rates_of_one_process(tiny, quant_checkpoint, kind, capsys):
    """The body of each fresh process of `cpu`: weight bytes are the checkpoint's (bf16), or for int8 a byte per
    quantized weight and a bf16 scale per row (the embedding and the router stay in bf16)."""
    benchmark.cpu_one(quant_checkpoint, kind, 3, 8)
    weights, before, peak, first, decode, batch8, prefill = map(float, capsys.readouterr().out.split())
    tensors = load_file(quant_checkpoint / "model.safetensors")
    if kind == "bf16":
        expected = sum(t.nbytes for t in tensors.values())
    else:
        quantized = {n for n, t in tensors.items() if t.dim() == 2 and "embed" not in n and "mlp.gate." not in n}
        expected = sum(t.numel() + 2 * t.shape[0] if n in quantized else t.nbytes for n, t in tensors.items())
    assert weights == expected
    assert 0 < before <= peak and first > 0 and decode > 0 and batch8 > 0 and prefill > 0


def fake_cpu_run(runs, calls):
    """subprocess.run for cpu()'s fresh processes: records each call, prints the next of `runs` as cpu_one does."""
    def run(cmd, **kw):
        calls.append((cmd, kw["env"]["TORCHINDUCTOR_CACHE_DIR"]))
        return subprocess.CompletedProcess(cmd, 0, " ".join(map(str, runs[(len(calls) - 1) % len(runs)])), "")
    return run


@pytest.mark.parametrize("llama", [True, False])
def test_cpu_table_takes_each_sides_better_run_and_their_ratios(tiny, monkeypatch, tmp_path, capsys, llama):
    """`cpu` needs checkpoints of OLMoE-1B-7B's shape and a llama.cpp build: here its fresh processes print given
    numbers (what cpu_one prints, tested above) and llama-bench gives given rates, and the table is checked
    against them: the run with the higher peak gives the memory, the better run of each side the rates."""
    checkpoint = tmp_path / "olmoe-1-layers"  # present: cpu() writes none
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    # weights, peak RSS before loading and at the end, first compiled call (s), decode b1, decode b8, prefill
    runs = [[2e9, 1e9, 3.5e9, 30.0, 10.0, 40.0, 200.0], [2e9, 1e9, 3.0e9, 5.0, 12.0, 38.0, 210.0]]
    calls, benches = [], iter([(11.0, 300.0, False), (15.0, 250.0, True)] * 4)  # before and after, each kind
    monkeypatch.setattr(subprocess, "run", fake_cpu_run(runs, calls))
    monkeypatch.setattr(llama_cpp, "gguf_files", lambda root, path, kinds: {k: path / f"{k}.gguf" for k in kinds})
    monkeypatch.setattr(llama_cpp, "bench", lambda root, gguf, steps, prompt_len: next(benches))
    benchmark.main(["cpu", str(tmp_path), "--layers", "1", "--threads", "1"] +
                   (["--llama-cpp", str(tmp_path / "llama.cpp")] if llama else []))
    out = capsys.readouterr().out
    rows = rows_of(out)
    assert [r[:2] for r in rows] == [["1", "bf16 / BF16"], ["1", "int8 / Q8_0"], ["1", "int8-dynamic / Q8_0"],
                                     ["1", "int4 / Q4_0"]]
    for row in rows:
        assert row[2:5] == ["2.00 GB", "2.50 GB (1.25x)", "10.0 / 12.0"]  # peak of the first run: 3.5 - 1 GB
        assert row[7:9] == ["40.0", "210"] and row[11] == "30.0 / 5.0"
        if llama:
            assert row[5:7] == ["11.0 / 15.0", f"{12 / 15:.2f}x"] and row[9:11] == ["300 / 250*", f"{210 / 300:.2f}x"]
        else:
            assert row[5:7] == ["-", "-"] and row[9:11] == ["-", "-"]
    assert ("* llama.cpp's prefill with --repack 0" in out) == llama
    # each precision twice, in fresh processes of cpu_one, sharing an inductor cache of their own
    assert [cmd[-1] for cmd, _ in calls] == ["bf16", "bf16", "int8", "int8", "int8-dynamic", "int8-dynamic", "int4",
                                             "int4"]
    assert all(cmd[:2] == [sys.executable, "-c"] and cmd[3] == str(checkpoint)
               and "benchmark.cpu_one(sys.argv[1], sys.argv[2], 32, 512, False)" in cmd[2] for cmd, _ in calls)
    caches = [cache for _, cache in calls]
    assert [caches[i] == caches[i + 1] for i in range(7)] == [True, False] * 3 + [True] and len(set(caches)) == 4


def test_cpu_measures_only_the_kinds_asked_for(monkeypatch, tmp_path, capsys):
    """--kinds: only those precisions' processes run, llama.cpp's files made and benched for those alone."""
    (tmp_path / "olmoe-1-layers").mkdir()
    (tmp_path / "olmoe-1-layers" / "config.json").write_text("{}")
    calls, asked, benched = [], [], []
    monkeypatch.setattr(subprocess, "run", fake_cpu_run([[2e9, 1e9, 3e9, 5.0, 10.0, 40.0, 200.0]], calls))
    monkeypatch.setattr(llama_cpp, "gguf_files", lambda root, path, kinds: asked.append(kinds) or
                        {k: path / f"{k}.gguf" for k in kinds})
    monkeypatch.setattr(llama_cpp, "bench", lambda root, gguf, *_: benched.append(gguf.name) or (9.0, 90.0, 0))
    benchmark.main(["cpu", str(tmp_path), "--layers", "1", "--threads", "1", "--kinds", "int8-dynamic", "int8",
                    "--llama-cpp", str(tmp_path)])
    assert [r[1] for r in rows_of(capsys.readouterr().out)] == ["int8-dynamic / Q8_0", "int8 / Q8_0"]
    assert [cmd[-1] for cmd, _ in calls] == ["int8-dynamic"] * 2 + ["int8"] * 2
    assert asked == [["int8-dynamic", "int8"]] and benched == ["int8-dynamic.gguf"] * 2 + ["int8.gguf"] * 2


# --------------------------------------------------------------------------------------------------------------
# accuracy and bpb: what quantizing costs


def reference_int8_error(w):
    """|w - w_q| / |w| of absmax int8 with one scale per row, written from the scheme."""
    s = w.abs().amax(-1, keepdim=True) / 127
    return ((w / s).round().clamp(-127, 127) * s - w).norm().item() / w.norm().item()


def test_accuracy_reports_weight_and_logit_errors_per_precision(tiny, tmp_path, capsys):
    """A 1-layer OLMoE of transformers' init in place of the small one the subcommand writes (its vocabulary kept,
    since the prompt's ids go up to 50000). lm_head's int8 error is the scheme's, computed here; int4 errs more
    than int8 and clip_search less than int4; bf16 agrees with itself and errs against float32 by what a bf16
    model of the same weights does, computed here on the same greedy tokens."""
    import transformers

    path = tmp_path / "small-OLMoE"
    torch.manual_seed(0)
    transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
        vocab_size=50304, hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_experts=8, num_experts_per_tok=2)).save_pretrained(path)
    benchmark.main(["accuracy", str(tmp_path), "--group-size", "32", "--threads", "1"])
    weight_table, logit_table = capsys.readouterr().out.split("\nLogits over")
    weights = {r[0]: [tuple(map(float, c.split(" / "))) for c in r[1:]] for r in rows_of(weight_table)}
    assert set(weights) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}
    lm_head = load_file(path / "model.safetensors")["lm_head.weight"]
    assert weights["lm_head"][0] == (round(reference_int8_error(lm_head), 4),) * 2  # one matrix: mean = max
    for int8, int4, clipped in weights.values():
        assert int8[0] < int4[0] and clipped[0] < int4[0]
    logits = {r[0]: r[1:] for r in rows_of(logit_table)}
    assert list(logits) == ["bf16", "int8", "int8-dynamic", "int4", "int4, clip_search"]
    assert logits["bf16"][0] == "0.0000 / 0.0000" and logits["bf16"][2] == "100.0%"
    vs_f32 = {k: float(v[1].split(" / ")[0]) for k, v in logits.items()}
    assert vs_f32["bf16"] < vs_f32["int8"] < vs_f32["int4, clip_search"] < vs_f32["int4"]  # clipping pays here too

    prompt = torch.randint(0, 50000, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    f32, bf16 = (olmoe.load_model(path, dtype=d) for d in (torch.float32, torch.bfloat16))
    ids = torch.tensor([prompt + generate.generate(f32, [prompt], 64)[0]])
    with torch.no_grad():
        a, b = (m(ids).logits[0, 15:-1].float() for m in (bf16, f32))
    rel = (a - b).norm(dim=-1) / b.norm(dim=-1)
    assert logits["bf16"][1] == f"{rel.mean():.4f} / {rel.max():.4f}"


def test_accuracy_at_the_real_width_writes_olmoe_1b_7bs_shape_with_two_layers_in_float32(tiny, tmp_path, monkeypatch,
                                                                                       capsys):
    """--real-width: the checkpoint is olmoe_with_layers(2) (here a tiny stand-in, asked for with n=2) written in
    float32, so that bf16 errs against it too; the same tables follow, every precision in them."""
    asked = []
    monkeypatch.setattr(benchmark, "olmoe_with_layers", lambda n: asked.append(n) or olmoe.OlmoeConfig(
        **dict(QUANT_TINY, vocab_size=50304)))
    benchmark.main(["accuracy", str(tmp_path), "--real-width", "--group-size", "32", "--threads", "1"])
    path = tmp_path / "olmoe-2-layers-float32"
    assert asked == [2] and olmoe.read_config(path).hidden_size == 64
    assert {t.dtype for t in load_file(path / "model.safetensors").values()} == {torch.float32}
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: OLMoE-1B-7B (D=64, 1 layers, 8 experts of width 32, top-2, V=50304)")
    logits = {r[0]: r[1:] for r in rows_of(out.split("\nLogits over")[1])}
    assert list(logits) == ["bf16", "int8", "int8-dynamic", "int4", "int4, clip_search"]
    assert float(logits["bf16"][1].split(" / ")[0]) > 0  # bf16 rounds float32's weights


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    (d / "a.txt").write_text("the quick brown fox jumps over the lazy dog; " * 12)
    (d / "b.txt").write_text("café, naïve, 日本語 — the lazy dog sleeps. " * 8)
    return d


@pytest.mark.parametrize("eos", [0, None])
def test_bpb_equals_evaluates_bits_per_byte_at_each_precision(tiny, tokenizer_json, texts, tmp_path, capsys, eos):
    """The float32 and bf16 rows are evaluate.py's --text bits per byte of the same checkpoint, texts and context
    at that dtype; the mean is the texts' mean, and each change is against the bf16 row's mean. A checkpoint
    without an eos id is scored as evaluate scores it (its first token unscored)."""
    _, path = gen_checkpoint(tmp_path, tokenizer_json, hidden_size=64, intermediate_size=32, eos_token_id=eos)
    text_args = ["--text", f"a={texts / 'a.txt'}", "--text", f"b={texts / 'b.txt'}", "--context", "32"]
    benchmark.main(["bpb", str(path), *text_args, "--group-size", "32", "--threads", "1"])
    rows = {r[0]: r[1:] for r in rows_of(capsys.readouterr().out)}
    assert list(rows) == ["float32", "bf16", "int8", "int8-dynamic", "int4", "int4, clip_search"]
    for dtype, row in (("float32", rows["float32"]), ("bfloat16", rows["bf16"])):
        scores = evaluate.main(["--checkpoint", str(path), *text_args, "--dtype", dtype])["text"]
        assert all(abs(float(c) - scores[n]["bits_per_byte"]) <= 0.6e-4 for c, n in zip(row[:2], ("a", "b"))), row
    base = float(rows["bf16"][2])
    for name, (a, b, mean, change) in rows.items():
        assert close(float(mean), (float(a) + float(b)) / 2, 4)
        if name == "float32":
            assert change == "—"  # before the bf16 row, the base
        else:
            # the printed change is of the unrounded means: each printed mean may be off by half its last place
            slack = 100 * 2 * 0.5e-4 / base
            assert abs(float(change.rstrip("%")) - 100 * (float(mean) / base - 1)) <= 0.005 + slack, (change, mean)
    assert rows["bf16"][3] == "+0.00%"
    assert rows["int4, clip_search"][:2] != rows["int4"][:2]  # other weights: clip_search reached the loader
