"""Tests for generate.py: cached decoding, batching, compilation, sampling and the command line."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch._inductor.utils import run_and_get_code

import generate as gen
import olmoe
from conftest import MODEL_VOCAB, TINY, TINY_MOE, TOKENIZER_VOCAB, copy_checkpoint, gen_checkpoint


def greedy_by_recomputing(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(logits[:TOKENIZER_VOCAB].argmax().item())
    return ids[len(prompt):]


@pytest.mark.parametrize("model_type", ["olmoe", "olmo2"])
def test_cached_decoding_equals_recomputing_the_sequence(tmp_path, tokenizer_json, model_type):
    _, path = gen_checkpoint(tmp_path, tokenizer_json, model_type)
    model = olmoe.load_model(path)
    prompt = [5, 17, 42, 7, 99]
    with torch.no_grad():
        expected = greedy_by_recomputing(model, prompt, 20)
    assert gen.generate(model, [prompt], 20, vocab_size=TOKENIZER_VOCAB) == [expected]


@pytest.mark.parametrize("model_type", ["olmoe", "olmo2"])
def test_batch_of_prompts_equals_each_prompt_alone(tmp_path, tokenizer_json, model_type):
    _, path = gen_checkpoint(tmp_path, tokenizer_json, model_type)
    model = olmoe.load_model(path)
    prompts = [[3, 1, 4, 1, 5, 9, 2], [6], [5, 3, 5, 8]]
    alone = [gen.generate(model, [p], 12)[0] for p in prompts]
    assert gen.generate(model, prompts, 12) == alone


@pytest.mark.parametrize("model_type", ["olmoe", "olmo2"])
def test_greedy_output_equals_transformers_generate(tmp_path, tokenizer_json, model_type):
    ref, path = gen_checkpoint(tmp_path, tokenizer_json, model_type)
    model = olmoe.load_model(path)
    from tokenizers import Tokenizer

    prompt = Tokenizer.from_file(str(tokenizer_json)).encode("the lazy fox").ids
    theirs = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, pad_token_id=0,
                          suppress_tokens=list(range(TOKENIZER_VOCAB, MODEL_VOCAB)))[0, len(prompt):].tolist()
    assert gen.generate(model, [prompt], 24, vocab_size=TOKENIZER_VOCAB) == [theirs]


@pytest.mark.parametrize("device", [("cpu", None), ("cpu", "amx"), ("cuda", (8, 0))])
@pytest.mark.parametrize("prompts", [[[3, 1, 4, 1, 5], [9, 2]], [[3, 1, 4], [1, 5], [9], [2, 6], [5, 3]]])
def test_compiled_decode_step_gives_the_same_tokens(tmp_path, tokenizer_json, monkeypatch, device, prompts):
    """torch.compile of the decode step (CUDA graphs on a GPU) is a fast path of the same function. With 2 rows
    of K = 2 of E = 8 experts the compiled step multiplies each pair by its expert (pairs on a CPU, gathered on a
    GPU); with 5 rows a CPU loops over the experts (a graph break), and an A100 computes them all (dense). Only the
    CPU's loop breaks the graph. Every device is simulated, this CPU too."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(olmoe, "device_facts", lambda _: device)
    _, path = gen_checkpoint(tmp_path, tokenizer_json)
    model = olmoe.load_model(path)
    torch._dynamo.reset()
    counters.clear()
    assert gen.generate(model, prompts, 10, compile=True) == gen.generate(model, prompts, 10)
    assert (sum(counters["graph_break"].values()) > 0) == (device != ("cuda", (8, 0)) and len(prompts) == 5)


@pytest.mark.parametrize("model_type", ["olmoe", "olmo2"])
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("cpu", [None, "amx"])
def test_compiled_bf16_decode_step_computes_eager_logits(tmp_path, tokenizer_json, monkeypatch, model_type, rows, cpu):
    """bf16, compiled against eager, both fed the same tokens (the sampler is replaced): each step's logits within
    bf16's rounding. One row on a CPU without AMX takes olmoe.linear_path's "gemv" in every linear layer; with AMX
    (simulated), its "mv" (torch.mv), also in the experts, which take moe_pairs. Greedy tokens are not compared: in
    bf16 a tiny random model's top logits tie within rounding, and they part even where every kernel is the same
    (with gemv turned off, the default compiled path did so here)."""
    monkeypatch.setattr(olmoe, "device_facts", lambda _: ("cpu", cpu))
    _, path = gen_checkpoint(tmp_path, tokenizer_json, model_type)
    model = olmoe.load_model(path, dtype=torch.bfloat16)
    forced = torch.tensor([[7, 3, 9, 12, 5, 8, 2, 11, 6, 4]] * rows)

    def run(compile):
        logits = []

        def sample(x, **_):
            logits.append(x.float())
            return forced[:, len(logits) - 1].contiguous()  # as sample returns: a strided column would recompile

        monkeypatch.setattr(gen, "sample", sample)
        gen.generate(model, [[3, 1, 4, 1, 5]] * rows, forced.shape[1], compile=compile)
        return torch.stack(logits)

    eager, compiled = run(False), run(True)
    assert (compiled - eager).abs().max() <= 0.02 * eager.abs().max()


@pytest.mark.parametrize("cpu", [None, "amx"])
def test_the_one_row_paths_are_the_linear_product(monkeypatch, cpu):
    """linear_path's choice, and what gemv (a CPU without AMX) and mv (with AMX) compute, compiled and eager: x @ w.T,
    against float32 F.linear, and mv's gradients against F.linear's."""
    assert olmoe.linear_path("cpu", None, torch.bfloat16, True, 1) == "gemv"
    assert olmoe.linear_path("cpu", "amx", torch.bfloat16, True, 1) == olmoe.linear_path(
        "cpu", "amx", torch.bfloat16, False, 1) == "mv"
    for facts in [("cpu", None, torch.bfloat16, False, 1), ("cpu", None, torch.bfloat16, True, 2),
                  ("cpu", None, torch.float32, True, 1), ("cpu", "amx", torch.bfloat16, True, 2),
                  ("cpu", "amx", torch.float32, False, 1), ("cuda", (9, 0), torch.bfloat16, True, 1),
                  ("mps", None, torch.bfloat16, True, 1)]:
        assert olmoe.linear_path(*facts) == "mm", facts
    torch.manual_seed(0)
    layer = olmoe.Linear(256, 96).to(torch.bfloat16)
    x = torch.randn(1, 1, 256, dtype=torch.bfloat16)
    monkeypatch.setattr(olmoe, "device_facts", lambda _: ("cpu", cpu))
    ref = F.linear(x.float(), layer.weight.float())
    with torch.no_grad():
        compiled, code = run_and_get_code(torch.compile(layer), x)
        for y in (compiled, layer(x)):
            assert y.shape == (1, 1, 96) and y.dtype == torch.bfloat16
            torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)
    assert ("torch.ops.olmoe.mv" in code[0]) == (cpu == "amx")  # torch.mv's kernel, not inductor's reduction
    if cpu == "amx":  # mv's backward, and a float32 weight under bf16 autocast (cast as autocast casts it)
        x.requires_grad_()
        layer(x).square().sum().backward()
        gx, gw = x.grad, layer.weight.grad
        x.grad = layer.weight.grad = None
        F.linear(x, layer.weight).square().sum().backward()
        torch.testing.assert_close((gx, gw), (x.grad, layer.weight.grad), rtol=2e-2, atol=2e-2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer.float()(x)
        torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)


def test_compiling_goes_on_past_dynamo_recompile_limit(tmp_path, tokenizer_json):
    """Batch sizes one after another, one more than dynamo's recompile limit (lowered to 2 here; 8 by default):
    each gets its own compiled step. With one code object shared by all, the last would run eagerly."""
    from torch._dynamo.utils import counters

    _, path = gen_checkpoint(tmp_path, tokenizer_json, "olmo2")  # dense: one graph per step, no MoE breaks
    model = olmoe.load_model(path)
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=2):
        for B in (1, 2, 3):
            prompts = [[3, 1, 4]] * B
            assert gen.generate(model, prompts, 3, compile=True) == gen.generate(model, prompts, 3)
    assert counters["stats"]["unique_graphs"] == 3


def test_compiled_decoding_is_kept_and_new_lengths_compile_nothing(tmp_path, tokenizer_json):
    """The compiled step lives beside the model, and the cache length is rounded up to a bucket: a later call
    with another prompt length and max_new_tokens reuses the compiled graph."""
    from torch._dynamo.utils import counters

    _, path = gen_checkpoint(tmp_path, tokenizer_json)
    model = olmoe.load_model(path)
    gen.generate(model, [[3, 1, 4, 1, 5]], 10, compile=True)
    step = model.compiled_decoding[2]
    counters.clear()
    out = gen.generate(model, [[9, 2, 6]], 20, compile=True)
    assert counters["stats"]["unique_graphs"] == 0 and model.compiled_decoding[2] is step
    assert out == gen.generate(model, [[9, 2, 6]], 20)
    gen.generate(model, [[9, 2, 6]], 70, compile=True)  # past the 64-slot bucket: one new graph, no more
    assert counters["stats"]["unique_graphs"] == 1


def sdpa_calls(monkeypatch):
    """Record what each attention call passes to scaled_dot_product_attention."""
    calls, real = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False):
        calls.append(dict(T=q.shape[2], mask=attn_mask is not None, causal=is_causal, gqa=enable_gqa,
                          kv_heads=k.shape[1]))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("prompts", [[[3, 1, 4, 1, 5, 9]], [[3, 1, 4, 1, 5, 9], [2, 6, 5, 3, 5, 8]]])
def test_unpadded_prefill_passes_no_mask(tmp_path, tokenizer_json, monkeypatch, prompts):
    """One prompt, or prompts of one length: the prefill is plain causal attention with no mask, which the flash
    kernel accepts; only decode steps, which read earlier slots of the cache, pass one."""
    _, path = gen_checkpoint(tmp_path, tokenizer_json)
    model = olmoe.load_model(path)
    calls = sdpa_calls(monkeypatch)
    gen.generate(model, prompts, 3)
    prefill = [c for c in calls if c["T"] == 6]
    assert len(prefill) == model.config.num_hidden_layers
    assert all(c["causal"] and not c["mask"] for c in prefill)
    assert all(c["mask"] for c in calls if c["T"] == 1)


def test_padded_gqa_prefill_keeps_gqa_off_the_math_kernel(tmp_path, tokenizer_json, monkeypatch):
    """Padding needs a mask; a mask with enable_gqa sends CUDA to the math kernel, whose float32 scores grow as
    H*T*S. So a padded prefill repeats K/V to all H heads instead, and still equals each prompt alone."""
    _, path = gen_checkpoint(tmp_path, tokenizer_json, "olmo2", num_key_value_heads=2)
    model = olmoe.load_model(path)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [5, 3]]
    calls = sdpa_calls(monkeypatch)
    batched = gen.generate(model, prompts, 6)
    prefill = [c for c in calls if c["T"] == 8]
    assert prefill and all(c["mask"] and not c["gqa"] and c["kv_heads"] == 4 for c in prefill)
    assert batched == [gen.generate(model, [p], 6)[0] for p in prompts]


@pytest.mark.parametrize("device, capability, macos14, expected", [
    ("cpu", None, None, torch.bfloat16),
    ("cuda", (9, 0), None, torch.bfloat16),  # H100
    ("cuda", (8, 0), None, torch.bfloat16),  # A100
    ("cuda", (7, 5), None, torch.float16),  # T4: bf16 only emulated
    ("cuda", (7, 0), None, torch.float16),  # V100
    ("mps", None, True, torch.bfloat16),
    ("mps", None, False, torch.float16),  # macOS 13: MPS has no bf16
])
def test_default_dtype_is_native_on_each_device(monkeypatch, device, capability, macos14, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Simulated GPU")
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: macos14)
    dtype, note = gen.native_dtype(torch.device(device), torch.bfloat16)
    assert dtype == expected
    assert (note is None) == (expected == torch.bfloat16)
    assert gen.native_dtype(torch.device(device), torch.float32) == (torch.float32, None)


def test_overflowing_logits_stop_with_one_line_naming_the_dtype(tmp_path, tokenizer_json, capsys):
    (tmp_path / "src").mkdir(), (tmp_path / "huge").mkdir()
    _, path = gen_checkpoint(tmp_path / "src", tokenizer_json)
    huge = copy_checkpoint(path, tmp_path / "huge", lambda t: {**t, "lm_head.weight": t["lm_head.weight"] * 1e6})
    (huge / "tokenizer.json").write_text(tokenizer_json.read_text())
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        gen.main(["--checkpoint", str(huge), "--prompt", "the", "--dtype", "float16", "--device", "cpu"])
    assert exit.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the logits overflowed") and "float16" in err[0]
    assert "--dtype bfloat16" in err[0]


def test_generation_stops_at_eos_per_row(tmp_path, tokenizer_json):
    _, path = gen_checkpoint(tmp_path, tokenizer_json)
    model = olmoe.load_model(path)
    prompts = [[1, 2, 3], [7, 8]]
    free = gen.generate(model, prompts, 10)
    eos = free[0][3]  # make row 0's fourth token the end of its text
    out = gen.generate(model, prompts, 10, eos_ids={eos})
    assert out == [row[: row.index(eos) + 1] if eos in row else row for row in free]
    assert len(out[0]) <= 4


def test_padded_vocabulary_ids_are_never_sampled(tmp_path, tokenizer_json):
    _, path = gen_checkpoint(tmp_path, tokenizer_json)
    model = olmoe.load_model(path)

    class FavourPadding(torch.nn.Linear):  # makes the padded ids by far the likeliest
        def forward(self, x):
            return super().forward(x) + 100 * (torch.arange(MODEL_VOCAB) >= TOKENIZER_VOCAB)

    model.lm_head = FavourPadding(TINY["hidden_size"], MODEL_VOCAB, bias=False)
    g = torch.Generator().manual_seed(0)
    for kw in [dict(), dict(temperature=1.0, generator=g)]:
        unrestricted = gen.generate(model, [[1, 2]], 8, **kw)[0]
        restricted = gen.generate(model, [[1, 2]], 8, vocab_size=TOKENIZER_VOCAB, **kw)[0]
        assert max(unrestricted) >= TOKENIZER_VOCAB and max(restricted) < TOKENIZER_VOCAB


def test_bytes_per_decode_step_counts_what_a_step_reads():
    config = olmoe.config_from_dict({**TINY_MOE, "model_type": "olmoe"})
    model = olmoe.Transformer(config)
    D, I, L, E, V = 32, 16, 2, 8, 96
    attention = 4 * D * D + 2 * D  # q, k, v, o and the q, k norms
    per_layer = attention + 2 * D + E * D  # the two block norms and the router
    dense = L * per_layer + D + V * D  # the final norm and lm_head
    B, S, hit = 3, 10, 5.5
    kv_cache = 2 * L * B * S * D
    expected = 4 * (dense + B * D + kv_cache + hit * 3 * I * D)  # float32; one embedding row per sequence
    assert gen.bytes_per_decode_step(model, B, S, hit) == expected


def test_sampling_is_a_pure_function_of_logits_and_generator():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    draw = lambda seed, **kw: gen.sample(logits, generator=torch.Generator().manual_seed(seed), **kw)  # noqa: E731
    assert torch.equal(draw(1, temperature=1.0), draw(1, temperature=1.0))
    assert not torch.equal(draw(1, temperature=1.0), draw(2, temperature=1.0))
    assert torch.equal(draw(0), logits.argmax(-1))
    assert torch.equal(draw(3, temperature=1.0, top_k=1), logits.argmax(-1))
    assert torch.equal(draw(3, temperature=1.0, top_p=1e-6), logits.argmax(-1))
    top3 = logits.topk(3).indices
    picks = torch.stack([draw(s, temperature=5.0, top_k=3) for s in range(50)])  # (50, 4)
    assert all(p in top3[row] for row in range(4) for p in picks[:, row])


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "generate.py", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def test_cli_end_to_end(tmp_path, tokenizer_json):
    _, path = gen_checkpoint(tmp_path, tokenizer_json)
    prompt = "café naïve"
    r = run_cli("--checkpoint", str(path), "--prompt", prompt, "--max-new-tokens", "16", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    expected = gen.generate(olmoe.load_model(path), [tok.encode(prompt).ids], 16, vocab_size=TOKENIZER_VOCAB)[0]
    assert r.stdout == prompt + tok.decode(expected) + "\n"  # the streamed pieces add up to the whole text
    stderr = r.stderr.strip().splitlines()  # one line of statistics, and no warnings before it
    assert len(stderr) == 1 and re.fullmatch(r"prefill \d+ tokens in \d+ ms \| decode [\d.]+ tok/s \| [\d.]+ GB/s \| "
                                             r"peak memory .*", stderr[0])

    r = run_cli("--checkpoint", str(path), "--prompt", "the", "--prompt", "lazy dog", "--max-new-tokens", "4",
                "--quantize", "int8")
    assert r.returncode == 0 and r.stdout.startswith("the") and "\n\nlazy dog" in r.stdout


def test_cli_peak_memory_is_its_own_not_its_parents(tmp_path, tokenizer_json):
    """On Linux a new process's ru_maxrss starts at its parent's high-water mark (the kernel keeps it across exec),
    so a CLI started by a notebook or a harness holding gigabytes would report theirs. The statistics line must
    report the CLI's own peak: here its parent holds 3 GB, and the CLI needs well under 1 GB."""
    _, path = gen_checkpoint(tmp_path, tokenizer_json)
    parent = ("import subprocess, sys; ballast = b'x' * (3 * 10**9); "
              "print(subprocess.run(sys.argv[1:], capture_output=True, text=True).stderr)")
    cli = [sys.executable, "generate.py", "--checkpoint", str(path), "--prompt", "the", "--max-new-tokens", "4"]
    r = subprocess.run([sys.executable, "-c", parent, *cli], capture_output=True, text=True, timeout=300)
    peak = float(re.search(r"peak memory ([\d.]+) GB \(process RSS\)", r.stdout).group(1))
    assert 0.05 < peak < 1.5, r.stdout


def test_cli_offline_hub_id_without_cache_is_one_clear_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    r = run_cli("--checkpoint", "allenai/OLMoE-1B-7B-0924", "--prompt", "hi", env=env)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "Connect once to download it" in r.stderr


# Shaped like OLMoE-1B-7B-Instruct's template: Jinja blocks on their own lines, trimmed as transformers does.
CHAT_TEMPLATE = """{{ bos_token }}{% for message in messages %}
{% if message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] }}
{% elif message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""


def test_chat_prompt_renders_as_transformers_renders_it(tokenizer_json):
    config = {"chat_template": CHAT_TEMPLATE, "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_json), bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE).apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False,
                                                          add_generation_prompt=True)
    assert gen.render_chat(config, "Hi there") == theirs == "<|endoftext|><|user|>\nHi there\n<|assistant|>\n"


def test_cli_chat_wraps_the_prompt(tmp_path, tokenizer_json, capsys):
    _, path = gen_checkpoint(tmp_path, tokenizer_json)
    argv = ["--checkpoint", str(path), "--prompt", "Hi", "--max-new-tokens", "3", "--chat"]
    with pytest.raises(SystemExit):
        gen.main(argv)
    assert "has no chat_template" in capsys.readouterr().err
    config = {"chat_template": CHAT_TEMPLATE, "bos_token": "<|endoftext|>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    gen.main(argv)
    assert capsys.readouterr().out.startswith("Hi")


@pytest.fixture(scope="module")
def cli_checkpoints(tmp_path_factory, tokenizer_json):
    """One good checkpoint and one broken in each way a user can meet, by name."""
    root = tmp_path_factory.mktemp("cli")
    _, good = gen_checkpoint(root / "good", tokenizer_json)

    def variant(name, edit_tensors=None, edit_config=None, raw_config=None, truncate=False, no_tokenizer=False,
                files=None):
        d = root / name
        d.mkdir()
        copy_checkpoint(good, d, edit_tensors=edit_tensors, edit_config=edit_config)
        if raw_config is not None:
            (d / "config.json").write_text(raw_config)
        if truncate:
            data = (d / "model.safetensors").read_bytes()
            (d / "model.safetensors").write_bytes(data[: len(data) - 100])
        if not no_tokenizer:
            (d / "tokenizer.json").write_text(tokenizer_json.read_text())
        for file, text in (files or {}).items():
            (d / file).write_text(text)
        return d

    def pop(t):
        del t["model.layers.0.self_attn.q_proj.weight"]
        return t

    def reshape(t):
        t["lm_head.weight"] = t["lm_head.weight"][:10]
        return t

    (root / "a_file").write_text("")
    return dict(good=good, missing_dir=root / "nowhere", a_file=root / "a_file",
                bad_json=variant("bad_json", raw_config="{"), llama=variant("llama", edit_config=lambda c: {
                    **c, "model_type": "llama"}), truncated=variant("truncated", truncate=True),
                missing_tensor=variant("missing_tensor", edit_tensors=pop),
                misshaped=variant("misshaped", edit_tensors=reshape), no_tokenizer=variant("no_tok", no_tokenizer=True),
                bad_tokenizer=variant("bad_tok", files={"tokenizer.json": "{bad"}),
                bad_generation_config=variant("bad_gen", files={"generation_config.json": "{bad"}))


BAD_INPUTS = {
    "missing checkpoint": (dict(checkpoint="missing_dir"), "no such directory"),
    "checkpoint is a file": (dict(checkpoint="a_file"), "not a directory"),
    "config not JSON": (dict(checkpoint="bad_json"), "config.json: not valid JSON"),
    "unknown model_type": (dict(checkpoint="llama"), "model_type 'llama' is not 'olmo2' or 'olmoe'"),
    "truncated safetensors": (dict(checkpoint="truncated"), "not a readable safetensors file"),
    "missing tensor": (dict(checkpoint="missing_tensor"), "missing, e.g. model.layers.0.self_attn.q_proj.weight"),
    "mis-shaped tensor": (dict(checkpoint="misshaped"), r"lm_head.weight has shape \(10, 32\), expected \(320, 32\)"),
    "no tokenizer.json": (dict(checkpoint="no_tokenizer"), "tokenizer.json: missing"),
    "broken tokenizer.json": (dict(checkpoint="bad_tokenizer"), "tokenizer.json: not a readable tokenizer"),
    "generation_config not JSON": (dict(checkpoint="bad_generation_config"), "generation_config.json: not valid JSON"),
    "beyond context": (dict(args=["--max-new-tokens", "200"]), "exceeds the context length of 128"),
    "max-new-tokens 0": (dict(args=["--max-new-tokens", "0"]), "max_new_tokens must be at least 1"),
    "negative temperature": (dict(args=["--temperature", "-1"]), "temperature >= 0"),
    "top-p 0": (dict(args=["--top-p", "0"]), "0 < top_p <= 1"),
    "top-p above 1": (dict(args=["--top-p", "1.5"]), "0 < top_p <= 1"),
    "negative top-k": (dict(args=["--top-k", "-2"]), "top_k >= 0"),
    "unknown dtype": (dict(args=["--dtype", "float8"]), "--dtype 'float8': expected one of"),
    "empty prompt": (dict(prompt=""), "prompt 1 is empty"),
    "cuda without a GPU": (dict(args=["--device", "cuda"]), "no CUDA GPU is available"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_cli_bad_input_is_one_line_error(case, cli_checkpoints, capsys):
    spec, message = BAD_INPUTS[case]
    if case == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    argv = ["--checkpoint", str(cli_checkpoints[spec.get("checkpoint", "good")]),
            "--prompt", spec.get("prompt", "the fox"), "--max-new-tokens", "4", *spec.get("args", [])]
    with pytest.raises(SystemExit) as exit_info:
        gen.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code != 0
    assert err.count("\n") == 1 and err.startswith("error: ") and re.search(message, err), err
