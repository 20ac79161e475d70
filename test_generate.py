"""Tests for generate.py: cached decoding, batching, compilation, sampling and the command line."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch._inductor.utils import run_and_get_code

import checkpoints
import fast
import generate as gen
import measure
import olmoe
from conftest import MODEL_VOCAB, TINY, TINY_MOE, TOKENIZER_VOCAB, copy_checkpoint, gen_checkpoint


def load(path, fast_paths):
    """olmoe.py's model of the checkpoint, alone (the reference) or with fast.py's kernels, as generate.py runs it."""
    model = olmoe.load_model(path)
    return fast.apply(model) if fast_paths else model


def greedy_by_recomputing(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(logits[:TOKENIZER_VOCAB].argmax().item())
    return ids[len(prompt):]


@pytest.mark.parametrize("model_type", ["olmoe", "olmo2"])
@pytest.mark.parametrize("fast_paths", [False, True])
def test_cached_decoding_equals_recomputing_the_sequence(tmp_path, tokenizer_json, model_type, fast_paths):
    _, path = gen_checkpoint(tmp_path, tokenizer_json, model_type)
    model = load(path, fast_paths)
    prompt = [5, 17, 42, 7, 99]
    with torch.no_grad():
        expected = greedy_by_recomputing(model, prompt, 20)
    assert gen.generate(model, [prompt], 20, vocab_size=TOKENIZER_VOCAB) == [expected]


@pytest.mark.parametrize("model_type", ["olmoe", "olmo2"])
@pytest.mark.parametrize("fast_paths", [False, True])
def test_batch_of_prompts_equals_each_prompt_alone(tmp_path, tokenizer_json, model_type, fast_paths):
    _, path = gen_checkpoint(tmp_path, tokenizer_json, model_type)
    model = load(path, fast_paths)
    prompts = [[3, 1, 4, 1, 5, 9, 2], [6], [5, 3, 5, 8]]
    alone = [gen.generate(model, [p], 12)[0] for p in prompts]
    assert gen.generate(model, prompts, 12) == alone


@pytest.mark.parametrize("model_type", ["olmoe", "olmo2"])
@pytest.mark.parametrize("fast_paths", [False, True])
def test_greedy_output_equals_transformers_generate(tmp_path, tokenizer_json, model_type, fast_paths):
    ref, path = gen_checkpoint(tmp_path, tokenizer_json, model_type)
    model = load(path, fast_paths)
    from tokenizers import Tokenizer

    prompt = Tokenizer.from_file(str(tokenizer_json)).encode("the lazy fox").ids
    theirs = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, pad_token_id=0,
                          suppress_tokens=list(range(TOKENIZER_VOCAB, MODEL_VOCAB)))[0, len(prompt):].tolist()
    assert gen.generate(model, [prompt], 24, vocab_size=TOKENIZER_VOCAB) == [theirs]


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


def test_compiled_decoding_is_kept_and_new_lengths_compile_nothing(tmp_path, tokenizer_json, monkeypatch):
    """The compiled step lives beside the model, and the cache length is rounded up to a bucket: a later call
    with another prompt length and max_new_tokens reuses the compiled graph (on a CPU class whose decode step is
    one graph, simulated)."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(fast, "device_facts", lambda _: ("cpu", "avx512"))
    _, path = gen_checkpoint(tmp_path, tokenizer_json)
    model = fast.apply(olmoe.load_model(path))  # one graph per step, as generate.py runs it
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


def frequencies(logits, n=20000, seed=0, **kw):
    """How often sample() picks each token of one row of logits (V,), over n draws made in one call: the row
    repeated n times as a batch."""
    picks = gen.sample(logits.repeat(n, 1), generator=torch.Generator().manual_seed(seed), **kw)  # (n,)
    return torch.bincount(picks, minlength=logits.shape[-1]) / n  # (V,)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampled_frequencies_are_softmax_of_logits_over_temperature(temperature):
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    expected = torch.exp(logits / temperature) / torch.exp(logits / temperature).sum()
    assert (frequencies(logits, temperature=temperature) - expected).abs().max() < 0.015


def test_top_k_samples_only_the_k_likeliest_in_their_renormalised_proportions():
    logits = torch.tensor([0.5, 2.0, -1.0, 1.0, 0.0, 1.5])
    kept = [1, 5, 3]  # the three largest logits
    expected = torch.zeros(6)
    expected[kept] = logits[kept].exp() / logits[kept].exp().sum()
    p = frequencies(logits, temperature=1.0, top_k=3)
    assert torch.equal(p > 0, expected > 0) and (p - expected).abs().max() < 0.015


@pytest.mark.parametrize("top_p, kept", [(0.45, 1), (0.7, 2), (0.79, 2), (0.81, 3), (0.96, 4)])
def test_top_p_samples_the_smallest_set_whose_mass_reaches_p(top_p, kept):
    """Probabilities 0.5, 0.3, 0.15, 0.05 (in shuffled order): the nucleus for p = 0.7 or 0.79 is the first two
    (their 0.8 reaches p), for p = 0.81 the first three; its tokens keep their relative proportions."""
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    ranked = [1, 3, 2, 0]
    expected = torch.zeros(4)
    expected[ranked[:kept]] = probs[ranked[:kept]] / probs[ranked[:kept]].sum()
    p = frequencies(probs.log(), temperature=1.0, top_p=top_p)
    assert torch.equal(p > 0, expected > 0) and (p - expected).abs().max() < 0.015


def test_top_p_stops_at_the_token_whose_mass_reaches_p_exactly():
    """Four equally likely tokens: probabilities 1/4 and their partial sums are exact in binary, so p = 1/2 is
    reached exactly by two tokens. The smallest set reaching it is those two; a hair above 1/2 needs a third."""
    for top_p, kept in [(0.25, 1), (0.5, 2), (0.5 + 1e-6, 3), (0.75, 3), (0.75 + 1e-6, 4)]:
        p = frequencies(torch.zeros(4), temperature=1.0, top_p=top_p)
        assert (p > 0).sum() == kept and (p[p > 0] - 1 / kept).abs().max() < 0.015, (top_p, p)


@pytest.mark.parametrize("temperature, top_k, top_p", [(2.0, 3, 1.0), (1.0, 3, 0.75), (0.5, 0, 0.6), (0.7, 5, 0.9)])
def test_sampled_frequencies_follow_transformers_warpers(temperature, top_k, top_p):
    """Temperature, then top-k, then top-p on what top-k kept, as transformers' sampling warpers apply them:
    with probabilities 0.4, 0.25, 0.15, 0.1, 0.06, 0.04, top-k 3 then top-p 0.75 keeps two tokens (top-p alone
    would keep three), and temperature 0.5 then top-p 0.6 keeps one (top-p before the temperature, two)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.tensor([0.06, 0.4, 0.1, 0.25, 0.04, 0.15]).log()
    warped = TemperatureLogitsWarper(temperature)(None, logits[None])
    warped = TopKLogitsWarper(top_k)(None, warped) if top_k else warped
    warped = TopPLogitsWarper(top_p)(None, warped) if top_p < 1 else warped
    expected = warped.softmax(-1)[0]
    p = frequencies(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    assert torch.equal(p > 0, expected > 0) and (p - expected).abs().max() < 0.015


def test_generate_samples_with_the_generator_it_is_given(tmp_path, tokenizer_json):
    """generate() draws only from its generator: the same seed gives the same tokens, whatever the global RNG
    does in between, and another seed other tokens."""
    _, path = gen_checkpoint(tmp_path, tokenizer_json)
    model = olmoe.load_model(path)
    draw = lambda seed: gen.generate(model, [[3, 1, 4]], 12, temperature=1.0,  # noqa: E731
                                     generator=torch.Generator().manual_seed(seed))
    first = draw(1)
    torch.rand(100)
    assert draw(1) == first != draw(2)


@pytest.mark.parametrize("n, limit, slots", [(1, 4096, 64), (64, 4096, 64), (65, 4096, 128), (1000, 4096, 1024),
                                             (1025, 4096, 2048), (70, 100, 100), (100, 100, 100)])
def test_cache_slots_round_up_to_a_power_of_two_within_the_context(n, limit, slots):
    assert gen.cache_slots(n, limit) == slots


def test_generate_stats_count_the_tokens_and_bytes_of_the_run(tmp_path, tokenizer_json):
    """Prefill tokens are the padded batch, B x longest prompt; decode tokens B per step after the first; a step
    reads the experts that some row chose: with identical rows that is K per layer, L x K in all."""
    _, path = gen_checkpoint(tmp_path, tokenizer_json)
    model = olmoe.load_model(path)
    L, K = TINY_MOE["num_hidden_layers"], TINY_MOE["num_experts_per_tok"]
    for prompts in ([[3, 1, 4, 1, 5]], [[3, 1, 4, 1, 5]] * 3):
        stats = {}
        gen.generate(model, prompts, 7, stats=stats)
        B = len(prompts)
        assert stats["prefill_tokens"] == B * 5 and stats["decode_tokens"] == B * 6
        assert stats["step_bytes"] == gen.bytes_per_decode_step(model, B, 5 + 7, L * K)
        assert stats["prefill_s"] > 0 and stats["decode_s"] > 0
    stats = {}
    gen.generate(model, [[3, 1, 4, 1, 5], [9, 2]], 4, stats=stats)
    assert stats["prefill_tokens"] == 2 * 5 and stats["decode_tokens"] == 2 * 3


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


def test_cli_offline_names_the_commands_that_make_a_model_here(tmp_path):
    """Offline, a Hub id that is not in the cache: the error gives the README's offline first run (test_docs checks
    that the README has these commands), the last of which generates from the run; once a train.py run is in
    runs/, one line names it instead."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    cli = [sys.executable, str(Path(gen.__file__).resolve()), "--checkpoint", "allenai/OLMoE-1B-7B-0924",
           "--prompt", "hi"]
    r = subprocess.run(cli, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stdout == ""
    first, *commands = r.stderr.strip().splitlines()
    assert first.startswith("error: allenai/OLMoE-1B-7B-0924: not a local directory") and "Connect once" in first
    assert "\n".join(commands) == checkpoints.OFFLINE
    assert commands[-1].startswith("python generate.py --checkpoint runs/olmoe-cpu ")
    for step in ("step-000050", "step-000100"):
        (tmp_path / "runs" / "mine" / step).mkdir(parents=True)
        (tmp_path / "runs" / "mine" / step / "config.json").write_text("{}")
    r = subprocess.run(cli, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert r.stderr.rstrip().endswith("or use the model trained here: --checkpoint runs/mine")


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


def spy_generate(monkeypatch):
    """Record each call of generate() that run() makes (the model and every argument), then run it."""
    calls, real = [], gen.generate

    def spy(model, prompts, max_new_tokens, **kw):
        calls.append(dict(model=model, prompts=prompts, max_new_tokens=max_new_tokens, **kw))
        return real(model, prompts, max_new_tokens, **kw)

    monkeypatch.setattr(gen, "generate", spy)
    return calls


def test_cli_chat_wraps_the_prompt(tmp_path, tokenizer_json, capsys, monkeypatch):
    """--chat: the model receives the ids of the rendered template, encoded without the tokenizer's special tokens
    (the template writes its own bos_token), and stdout echoes the user's prompt. Without --chat it receives the
    prompt's ids with them. This tokenizer prepends <|endoftext|>, so a doubled or a missing one shows."""
    from tokenizers import Tokenizer, processors

    _, path = gen_checkpoint(tmp_path, tokenizer_json)
    tok = Tokenizer.from_file(str(tokenizer_json))
    bos = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>",
                                                                                                   bos)])
    tok.save(str(path / "tokenizer.json"))
    argv = ["--checkpoint", str(path), "--prompt", "Hi", "--max-new-tokens", "3", "--chat"]
    with pytest.raises(SystemExit):
        gen.main(argv)
    assert "has no chat_template" in capsys.readouterr().err
    config = {"chat_template": CHAT_TEMPLATE, "bos_token": "<|endoftext|>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    calls = spy_generate(monkeypatch)
    gen.main(argv)
    assert capsys.readouterr().out.startswith("Hi")
    rendered = tok.encode("<|endoftext|><|user|>\nHi\n<|assistant|>\n", add_special_tokens=False).ids
    assert rendered.count(bos) == 1 and calls[0]["prompts"] == [rendered]
    gen.main(argv[:-1])
    assert calls[1]["prompts"] == [[bos] + tok.encode("Hi", add_special_tokens=False).ids]
    assert capsys.readouterr().out.startswith("Hi")


@pytest.fixture(scope="module")
def sharp_checkpoint(tmp_path_factory, tokenizer_json):
    """A tiny OLMoE whose logits spread over several units (lm_head scaled up), so that temperature, top-k and top-p
    change the tokens sampled: a random tiny model's logits are nearly uniform. Tests read it, never write it."""
    root = tmp_path_factory.mktemp("sharp")
    (root / "src").mkdir(), (root / "sharp").mkdir()
    _, src = gen_checkpoint(root / "src", tokenizer_json)
    path = copy_checkpoint(src, root / "sharp", lambda t: {**t, "lm_head.weight": t["lm_head.weight"] * 30})
    (path / "tokenizer.json").write_text(tokenizer_json.read_text())
    return path


def cli(capsys, path, *flags, prompts=("the fox",), max_new_tokens=12):
    """Run generate.main on the CPU; return its stdout and stderr."""
    capsys.readouterr()
    gen.main(["--checkpoint", str(path), "--device", "cpu", "--max-new-tokens", str(max_new_tokens), *flags,
              *[a for p in prompts for a in ("--prompt", p)]])
    return capsys.readouterr()


def expected_text(path, prompt, n, seed=0, **kw):
    """What the CLI should print after the prompt: generate() on the checkpoint's model and tokenizer, with a
    generator seeded as given, the padded vocabulary cut off."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    out = gen.generate(olmoe.load_model(path), [tok.encode(prompt).ids], n, vocab_size=TOKENIZER_VOCAB,
                       generator=torch.Generator().manual_seed(seed), **kw)[0]
    return tok.decode(out)


SAMPLING_FLAGS = {  # flags, generate()'s arguments they mean, the seed, and arguments whose text must differ
    "temperature": (["--temperature", "0.7", "--seed", "3"], dict(temperature=0.7), 3, [{}, dict(temperature=1.0)]),
    "top-k": (["--temperature", "1", "--top-k", "3", "--seed", "3"], dict(temperature=1.0, top_k=3), 3,
              [dict(temperature=1.0)]),
    "top-p": (["--temperature", "1", "--top-p", "0.5", "--seed", "3"], dict(temperature=1.0, top_p=0.5), 3,
              [dict(temperature=1.0)]),
    "top-k 1 is greedy": (["--temperature", "1", "--top-k", "1"], dict(), 0, [dict(temperature=1.0)]),
    "top-p near 0 is greedy": (["--temperature", "1", "--top-p", "0.001"], dict(), 0, [dict(temperature=1.0)]),
}


@pytest.mark.parametrize("case", SAMPLING_FLAGS)
def test_cli_sampling_flags_sample_as_generate_does(case, sharp_checkpoint, capsys):
    """Each sampling flag reaches the sampler with its value: the CLI prints what generate() gives with those
    arguments and a generator seeded by --seed, which is not what it gives without the flag."""
    flags, kw, seed, others = SAMPLING_FLAGS[case]
    expected = expected_text(sharp_checkpoint, "the fox", 12, seed, **kw)
    assert cli(capsys, sharp_checkpoint, *flags).out == "the fox" + expected + "\n"
    for other in others:
        assert expected_text(sharp_checkpoint, "the fox", 12, seed, **other) != expected, other


def test_cli_seed_fixes_the_sampled_text(sharp_checkpoint, capsys):
    run = lambda seed: cli(capsys, sharp_checkpoint, "--temperature", "1", "--seed", seed).out  # noqa: E731
    assert run("1") == run("1") != run("2")


def test_cli_compile_gives_the_same_text_and_keeps_the_compiled_step(sharp_checkpoint, capsys, monkeypatch):
    """--compile reaches generate(): the model it decodes with keeps its compiled step, for a cache of
    cache_slots(T + max_new_tokens) = 64 slots. torch.compile is replaced by the function itself, so nothing is
    compiled: the compiled step's equality with eager decoding is tested above."""
    plain = cli(capsys, sharp_checkpoint).out
    calls = spy_generate(monkeypatch)
    monkeypatch.setattr(torch, "compile", lambda f, **_: f)
    assert cli(capsys, sharp_checkpoint, "--compile").out == plain
    assert calls[0]["compile"] and calls[0]["model"].compiled_decoding[0][:2] == (1, 64)


def test_cli_moe_dispatch_naive_runs_the_naive_dispatch(sharp_checkpoint, capsys, monkeypatch):
    runs, naive = [], olmoe.DISPATCH["naive"]
    monkeypatch.setitem(olmoe.DISPATCH, "naive", lambda *a: runs.append(1) or naive(*a))
    batched = cli(capsys, sharp_checkpoint).out
    assert not runs
    assert cli(capsys, sharp_checkpoint, "--moe-dispatch", "naive").out == batched
    assert len(runs) == 12 * TINY_MOE["num_hidden_layers"]  # every layer of the prefill and of 11 decode steps


def test_cli_runs_fast_paths_unless_reference(sharp_checkpoint, capsys, monkeypatch):
    """By default the CLI decodes with fast.py's modules; --reference with olmoe.py's own, to the same text."""
    calls = spy_generate(monkeypatch)
    fast_text = cli(capsys, sharp_checkpoint).out
    reference_text = cli(capsys, sharp_checkpoint, "--reference").out
    classes = [{type(m) for m in call["model"].modules()} for call in calls]
    assert {fast.Attention, fast.Experts, fast.Linear} <= classes[0]
    assert not {fast.Attention, fast.Experts, fast.Linear} & classes[1]
    assert {olmoe.Attention, olmoe.Experts, torch.nn.Linear} <= classes[1]
    assert reference_text == fast_text


@pytest.mark.parametrize("flags, dtype", [([], torch.bfloat16), (["--dtype", "float32"], torch.float32),
                                          (["--dtype", "float16"], torch.float16)])
def test_cli_dtype_is_the_models(tmp_path, tokenizer_json, capsys, monkeypatch, flags, dtype):
    """--dtype sets the dtype the model decodes in; without it, the checkpoint's own (bfloat16 here)."""
    (tmp_path / "src").mkdir(), (tmp_path / "bf16").mkdir()
    _, src = gen_checkpoint(tmp_path / "src", tokenizer_json)
    path = copy_checkpoint(src, tmp_path / "bf16", edit_config=lambda c: {
        **{k: v for k, v in c.items() if k != "torch_dtype"}, "dtype": "bfloat16"})
    (path / "tokenizer.json").write_text(tokenizer_json.read_text())
    calls = spy_generate(monkeypatch)
    assert cli(capsys, path, *flags, max_new_tokens=3).out.startswith("the fox")
    assert {p.dtype for p in calls[0]["model"].parameters()} == {dtype}


@pytest.mark.parametrize("kind, bits", [("int8", 8), ("int4", 4)])
def test_cli_quantize_decodes_with_quantized_layers(tmp_path, tokenizer_json, capsys, monkeypatch, kind, bits):
    """--quantize: every linear layer but the router, and the experts, are quantize's modules of that many bits,
    and the text is what that quantized model gives. Width 128, the int4 group size."""
    import quantize

    _, path = gen_checkpoint(tmp_path, tokenizer_json, hidden_size=128, intermediate_size=128)
    calls = spy_generate(monkeypatch)
    out = cli(capsys, path, "--quantize", kind, max_new_tokens=4).out
    layers = calls[0]["model"].model.layers
    for layer in layers:
        for m in [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj]:
            assert isinstance(m, quantize.QuantLinear) and m.bits == bits
        assert isinstance(layer.mlp.experts, quantize.QuantExperts) and layer.mlp.experts.bits == bits
        assert not isinstance(layer.mlp.gate, quantize.Quantized)
    assert isinstance(calls[0]["model"].lm_head, quantize.QuantLinear)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    model = quantize.load_model(path, kind)
    assert out == "the fox" + tok.decode(gen.generate(model, [tok.encode("the fox").ids], 4,
                                                      vocab_size=TOKENIZER_VOCAB)[0]) + "\n"


@pytest.mark.parametrize("source", ["config.json", "generation_config.json"])
def test_cli_stops_at_eos_and_prints_no_eos_text(tmp_path, tokenizer_json, capsys, source):
    """The eos ids come from config.json and generation_config.json: the text ends before the first one, and the
    eos token's own text is never printed, by the stream or by the batch of prompts."""
    _, path = gen_checkpoint(tmp_path, tokenizer_json)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    free = gen.generate(olmoe.load_model(path), [tok.encode("the fox").ids], 12, vocab_size=TOKENIZER_VOCAB)[0]
    i = next(i for i in range(2, 12) if free[i] not in free[:i] and tok.decode([free[i]]))  # a first, visible eos
    config = json.loads((path / source).read_text()) if source == "config.json" else {}
    (path / source).write_text(json.dumps({**config, "eos_token_id": [free[i], TOKENIZER_VOCAB - 1]}))
    assert cli(capsys, path).out == "the fox" + tok.decode(free[:i]) + "\n"
    assert cli(capsys, path, prompts=["the fox", "the fox"]).out == 2 * ("the fox" + tok.decode(free[:i]) + "\n\n")


def test_cli_prints_each_prompt_and_its_text_in_order(tmp_path, tokenizer_json, capsys):
    """More than one prompt: each prompt then its text, a blank line after each, in the order given; nothing
    streamed before."""
    _, path = gen_checkpoint(tmp_path, tokenizer_json)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    prompts = ["the", "lazy dog", "café"]
    outs = gen.generate(olmoe.load_model(path), [tok.encode(p).ids for p in prompts], 6, vocab_size=TOKENIZER_VOCAB)
    assert cli(capsys, path, prompts=prompts, max_new_tokens=6).out == "".join(
        p + tok.decode(o) + "\n\n" for p, o in zip(prompts, outs))


def test_cli_streams_one_prompts_text_and_holds_back_half_characters(sharp_checkpoint, capsys, monkeypatch):
    """One prompt: the prompt is printed at once, then the text as the tokens come, never a piece to take back.
    Here generate() yields the two byte tokens of "é" (0xC3 0xA9, "Ã" and "©" in the byte-level alphabet), then
    "x": the first byte alone would print as U+FFFD, so nothing is printed until the second completes it."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(sharp_checkpoint / "tokenizer.json"))
    ids = [tok.token_to_id("Ã"), tok.token_to_id("©"), tok.token_to_id("x")]
    pieces = []

    def fake(model, prompts, n, on_token, stats, **_):
        pieces.append(capsys.readouterr().out)
        for i in ids:
            on_token([i])
            pieces.append(capsys.readouterr().out)
        stats.update(prefill_s=0.1, prefill_tokens=2, decode_s=0.1, decode_tokens=2, step_bytes=1)
        return [ids]

    monkeypatch.setattr(gen, "generate", fake)
    pieces.append(cli(capsys, sharp_checkpoint, prompts=["the"]).out)
    assert pieces == ["the", "", "é", "x", "\n"]


def test_cli_statistics_line_reports_the_runs_numbers(sharp_checkpoint, capsys, monkeypatch):
    """stderr's line from generate()'s stats: 2 prompts decoding 40 tokens in 2 s are 20 tok/s and 10 steps/s;
    500 MB a step at 10 steps/s is 5 GB/s; and the CPU's class. With one new token there is no decode rate (and no
    division by 0)."""
    def fake(model, prompts, n, stats, **_):
        stats.update(prefill_s=0.25, prefill_tokens=6, decode_s=2.0 if n > 1 else 0.0,
                     decode_tokens=40 if n > 1 else 0, step_bytes=5e8)
        return [[5]] * len(prompts)

    monkeypatch.setattr(gen, "generate", fake)
    monkeypatch.setattr(measure, "peak_memory", lambda device: 1.5e9)
    monkeypatch.setattr(fast, "device_facts", lambda device: ("cpu", "other"))  # fast.cpu_class of an ARM laptop
    err = cli(capsys, sharp_checkpoint, prompts=["the", "fox"]).err
    assert err == ("prefill 6 tokens in 250 ms | decode 20.0 tok/s | 5.0 GB/s | peak memory 1.50 GB (process RSS) | "
                   "CPU class other (never measured: the portable kernels)\n")
    err = cli(capsys, sharp_checkpoint, prompts=["the", "fox"], max_new_tokens=1).err
    assert err.startswith("prefill 6 tokens in 250 ms | decode 0.0 tok/s | 0.0 GB/s |")


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
    "group size without int4": (dict(args=["--group-size", "64"]), "--group-size is int4's"),
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
    out, err = capsys.readouterr()
    assert exit_info.value.code != 0
    assert err.count("\n") == 1 and err.startswith("error: ") and re.search(message, err), err
    assert out == ""  # checked before the prompt is echoed


def test_cli_an_error_after_streaming_began_starts_on_its_own_line(cli_checkpoints, monkeypatch, capsys):
    """An overflow found after some tokens were printed: stdout ends its line, so the error is not glued to it."""
    def overflowing(model, prompts, max_new_tokens, on_token, **kw):
        on_token([5])
        raise gen.NonFiniteLogits("the logits overflowed")

    monkeypatch.setattr(gen, "generate", overflowing)
    with pytest.raises(SystemExit):
        gen.main(["--checkpoint", str(cli_checkpoints["good"]), "--prompt", "the fox"])
    out, err = capsys.readouterr()
    assert out.startswith("the fox") and out.endswith("\n") and out.count("\n") == 1
    assert err == "error: the logits overflowed\n"


def parsed_args(monkeypatch, *argv):
    """The namespace main() hands to run() for these arguments (run is replaced: nothing is loaded)."""
    seen = []
    monkeypatch.setattr(gen, "run", seen.append)
    gen.main(list(argv))
    return seen[0]


def test_cli_compile_is_a_flag_that_takes_no_value(monkeypatch):
    """--compile is a switch: it is on when given, wherever it stands, and off when not, never a value to supply."""
    assert parsed_args(monkeypatch, "--compile", "--prompt", "the").compile is True
    assert parsed_args(monkeypatch, "--prompt", "the", "--compile").compile is True
    assert parsed_args(monkeypatch, "--prompt", "the").compile is False


def test_cli_moe_dispatch_takes_batched_or_naive_by_name(monkeypatch, capsys):
    for name in ("batched", "naive"):
        assert parsed_args(monkeypatch, "--prompt", "the", "--moe-dispatch", name).moe_dispatch == name
    assert parsed_args(monkeypatch, "--prompt", "the").moe_dispatch == "batched"
    with pytest.raises(SystemExit) as exit_info:
        parsed_args(monkeypatch, "--prompt", "the", "--moe-dispatch", "grouped")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "invalid choice" in err and "grouped" in err, err


def test_cli_quantize_refuses_other_kinds_before_loading_anything(monkeypatch, capsys):
    """--quantize int8 and int4 reach run(); any other kind is argparse's usage error (exit 2), naming the choices,
    before a checkpoint is even looked for."""
    for kind in ("int8", "int4"):
        assert parsed_args(monkeypatch, "--prompt", "the", "--quantize", kind).quantize == kind
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        parsed_args(monkeypatch, "--prompt", "the", "--quantize", "int3")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "invalid choice" in err and re.search(r"int3.*int8.*int4", err), err


@pytest.mark.parametrize("bos_token, rendered_bos", [
    (None, ""),  # "bos_token": null, as some tokenizer_config.json files have
    ({"content": "<|endoftext|>", "special": True}, "<|endoftext|>"),  # an AddedToken written as a dict
    ({"special": True}, ""),  # a dict without content
])
def test_chat_template_renders_a_missing_special_token_as_nothing(bos_token, rendered_bos):
    """A bos_token that is null, or a dict without "content", renders as the empty string (transformers leaves
    such a token out, and Jinja would print "None"); an AddedToken dict renders as its content."""
    config = {"chat_template": CHAT_TEMPLATE, "bos_token": bos_token, "eos_token": None}
    assert gen.render_chat(config, "Hi there") == rendered_bos + "<|user|>\nHi there\n<|assistant|>\n"
