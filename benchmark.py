"""Every measurement of this project, each a subcommand; all but bpb on random weights (no download).

    python benchmark.py check                   # any device: is every path right here, and how fast?
    python benchmark.py speed --shape OLMoE-1B-7B   # decoding and prefill against transformers, same weights
    python benchmark.py quantized DIR           # decode speed of bf16 / int8 / int4 on an OLMoE-shaped checkpoint
    python benchmark.py rows                    # one compiled decode row through each product a CPU rule picks from
    python benchmark.py cpu DIR                 # bf16 / int8 / int4 speed, memory and start-up, 2 and 16 layers,
                          [--llama-cpp LLAMA_CPP_DIR]   # ... beside llama.cpp's BF16 / Q8_0 / Q4_0
    python benchmark.py accuracy DIR            # weight and logit error of int8 / int4 on a small OLMoE
    python benchmark.py bpb CHECKPOINT --text prose=FILE   # bits per byte of a trained model at each precision
    python benchmark.py train                   # one training step against transformers, the same weights

check compares this device with the CPU on small models (float32 logits, the native dtype's logits, compiled
against eager tokens, every MoE path against the naive dispatch), then times the OLMoE-1B-7B layer shape and prints
each figure as a fraction of its bound: the bytes a decode step must read over the measured copy bandwidth, or a
prefill's FLOPs over the measured matmul rate. Checkpoints these commands need are written once into DIR by
write_random_checkpoint: random_model's weights saved by olmoe.save_model, the writer train.py uses too.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import checkpoints
import devices
import fast
import generate as gen
import llama_cpp
import measure
import olmoe
import quantize
import text

SHAPES = {  # the released shapes, and small ones of the same kind for a CPU
    "OLMoE-1B-7B": lambda: olmoe.PRESETS["OLMoE-1B-7B-0924"](),
    "OLMo-2-1B": lambda: olmoe.PRESETS["OLMo-2-0425-1B"](),
    "small-OLMoE": lambda: olmoe.OlmoeConfig(hidden_size=512, intermediate_size=256, num_hidden_layers=4,
                                             num_attention_heads=8, num_experts=64, num_experts_per_tok=8),
    "small-OLMo-2": lambda: olmoe.Olmo2Config(vocab_size=100352, hidden_size=512, intermediate_size=2048,
                                              num_hidden_layers=4, num_attention_heads=8),
    # train.py's olmoe-cpu preset with the vocabulary its default BPE gets: OLMoE's 64 experts, top-8, made small
    "olmoe-cpu": lambda: olmoe.OlmoeConfig(vocab_size=4096, hidden_size=128, intermediate_size=64, num_hidden_layers=4,
                                           num_attention_heads=4, num_experts=64, num_experts_per_tok=8,
                                           eos_token_id=0, pad_token_id=1),
}


def taking_turns(measures: dict, repeat):
    """Each measure's median over `repeat` rounds in which they all take turns, after one warm-up round: a slow
    moment of a shared machine falls on all of them alike. measures: name -> a function returning a number."""
    values = {name: [] for name in measures}
    for r in range(repeat + 1):
        for name, fn in measures.items():
            value = fn()
            if r:
                values[name].append(value)
    return {name: sorted(v)[repeat // 2] for name, v in values.items()}


def median_decode(model, prompts, steps, compile):
    """generate()'s stats of the median of three runs, after one that warms up (and compiles)."""
    runs = [{} for _ in range(4)]
    for stats in runs:
        gen.generate(model, prompts, steps, compile=compile, stats=stats)
    return sorted(runs[1:], key=lambda s: s["decode_s"])[1]


def device_ceilings(device, dtype):
    """Measured copy bandwidth (bytes read + written per second) and matmul rate in dtype (FLOP/s)."""
    n = 2**28  # 256 MB: larger than any cache, so the copy streams from memory
    a, b = torch.empty(n, dtype=torch.uint8, device=device).random_(), torch.empty(n, dtype=torch.uint8, device=device)
    bandwidth = 2 * n / measure.timed(lambda: b.copy_(a), measure.synchronizer(device), repeat=10)
    return bandwidth, measure.matmul_rate(device, dtype, repeat=10)


def random_model(config, device, dtype, seed=0, moe_dispatch="batched", reference=False):
    """This project's model of config with random weights (norms 1, the rest N(0, 0.02)), built on the device, with
    fast.py's paths unless reference."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = olmoe.Transformer(config, moe_dispatch)
    model.to(dtype).to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
        for layer in model.model.layers:  # sharper routing, as a trained router's, so ties are rare
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.mul_(20)
    return with_fast_paths(model.eval(), reference)


def with_fast_paths(model, reference=False):
    """model with fast.py's kernels (fast.apply), as generate.py runs it; reference: olmoe.py's plain modules."""
    return model if reference else fast.apply(model)


def write_random_checkpoint(config, path, dtype=torch.bfloat16, seed=0):
    """random_model's weights as a Hub-layout checkpoint in path (olmoe.save_model), built on the CPU in dtype."""
    print(f"writing a random {dtype_name(dtype)} checkpoint to {path}", file=sys.stderr)
    return olmoe.save_model(random_model(config, torch.device("cpu"), dtype, seed), path)


def twin_models(config, device, dtype, reference=False):
    """A random transformers model of this config and ours holding the very same weights (the names agree)."""
    import transformers

    hf_cls = {"olmoe": transformers.OlmoeForCausalLM, "olmo2": transformers.Olmo2ForCausalLM}[config.model_type]
    fields = {k: v for k, v in vars(config).items() if not k.startswith("rope") and k != "dtype"}
    hf_config = hf_cls.config_class(**fields, rope_parameters=dict(rope_type="default", rope_theta=config.rope_theta))
    torch.manual_seed(0)
    with torch.device(device):
        hf = hf_cls(hf_config).to(dtype).eval()
    with torch.device("meta"):
        ours = olmoe.Transformer(config)
    ours.to(dtype).to_empty(device=device).load_state_dict(hf.state_dict())
    return hf, with_fast_paths(ours.eval(), reference)


def prefill_flops(model, T):
    """Matmul FLOPs of a T-token prefill: the weights', and causal attention's (half of QK^T and AV)."""
    c = model.config
    attention = 2 * c.num_hidden_layers * T**2 * c.num_attention_heads * c.head_dim
    return 2 * T * measure.active_params(c, lm_head=False) + attention


def native_dtype_of(device):
    return devices.native_dtype(device, torch.bfloat16)[0]


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------------------------
# --check: is every path right on this device, and how close to its bound is each figure?


def check_paths(device, models=("OLMoE", "OLMo2 GQA"), batches=(1, 8)):
    """The correctness half of --check, on small random models; returns a list of (what, ok, detail)."""
    dtype, results = native_dtype_of(device), []
    small = dict(vocab_size=1024, hidden_size=256, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=512)
    configs = {"OLMoE": olmoe.OlmoeConfig(**small, num_experts=64, num_experts_per_tok=8),
               "OLMo2 GQA": olmoe.Olmo2Config(**small, num_key_value_heads=2)}
    ids = torch.randint(0, 1024, (2, 64), generator=torch.Generator().manual_seed(0))
    for name in models:
        config = configs[name]
        # The reference is the specification: olmoe.py alone, float32 on the CPU with the naive MoE dispatch, which
        # no device choice touches, so that on a CPU too the device's paths are compared with something else.
        cpu = random_model(config, torch.device("cpu"), torch.float32, moe_dispatch="naive", reference=True)
        with torch.no_grad():
            ref = cpu(ids).logits
            here = random_model(config, device, torch.float32)
            err = (here(ids.to(device)).logits.cpu() - ref).abs().max().item()
            results.append((f"{name} float32 logits == CPU, naive dispatch", err < 1e-4, f"max |error| {err:.1e}"))
            low = random_model(config, device, dtype)
            rel = ((low(ids.to(device)).logits.float().cpu() - ref).norm() / ref.norm()).item()
            results.append((f"{name} {dtype_name(dtype)} logits ~ CPU float32", rel < 3e-2,
                            f"relative error {rel:.1e}"))
        prompts = ids[:, :16].tolist()
        for B in batches:
            rows = (prompts * B)[:B]
            same = gen.generate(here, rows, 16, compile=True) == gen.generate(here, rows, 16)
            results.append((f"{name} compiled == eager tokens, batch {B}", same, "float32, greedy"))

    moe = random_model(configs["OLMoE"], device, dtype).model.layers[0].mlp
    for N in (1, 8, 64):
        x = torch.randn(N, 256, device=device, dtype=dtype)
        top_w, top_i = moe.gate(x).softmax(-1, dtype=torch.float32).topk(8, dim=-1)
        top_w = top_w.to(dtype)
        ref = olmoe.moe_naive(x, top_w, top_i, moe.experts).float()
        for path, fn in fast.MOE_PATHS.items():
            rel = ((fn(x, top_w, top_i, moe.experts).float() - ref).norm() / ref.norm()).item()
            results.append((f"MoE path {path} == naive, {N} tokens", rel < 2e-2, f"relative error {rel:.1e}"))
    return results


def cpu_kernels(facts):
    """One line: the CPU's class (fast.cpu_class), whether its rules were measured, and the kernel each precision's
    linear layers take for a compiled decode row and for a 512-token prefill, on OLMoE-1B-7B's 2048 x 2048 shape."""
    kernels = {"bf16": [fast.linear_path(*facts, torch.bfloat16, True, n) for n in (1, 512)],
               "int8": [quantize.int8_path(*facts, True, n, 2048) for n in (1, 512)],
               "int8-dynamic": [quantize.choose_kernel(8, *facts, torch.bfloat16, 2048, 2048, 128, dynamic=True)] * 2,
               "int4": [quantize.choose_kernel(4, *facts, torch.bfloat16, 2048, 2048, 128)] * 2}
    return (f"{fast.cpu_note(facts[1])} here; kernels, decode row / prefill: " +
            ", ".join(f"{kind} {a} / {b}" for kind, (a, b) in kernels.items()) +
            f"; decode attention {fast.attention_path(*facts)}")


def check(device, steps=32):
    device = torch.device(device)
    dtype, sync = native_dtype_of(device), measure.synchronizer(device)
    print(f"# self-check on {devices.device_name(device)}, torch {torch.__version__}")
    results = check_paths(device)
    print_results(results)
    facts = fast.device_facts(device)
    print("MoE path here: " + ", ".join(f"{N} tokens {'compiled' if c else 'eager'} -> "
                                        f"{fast.moe_path(*facts, dtype, c, N, 8, 64)}"
                                        for N in (1, 8, 64, 2048) for c in (False, True)))
    if device.type == "cpu":
        print(cpu_kernels(facts))

    # Speed: the OLMoE-1B-7B layer shape with 4 of its 16 layers (per-token figures scale with the layers).
    bandwidth, flops = device_ceilings(device, dtype)
    config = SHAPES["OLMoE-1B-7B"]()
    config.num_hidden_layers = 4
    model = random_model(config, device, dtype)
    print(f"\nOLMoE-1B-7B shape, 4 of 16 layers, random weights, {dtype_name(dtype)}; measured copy bandwidth "
          f"{bandwidth / 1e9:.0f} GB/s, matmul {flops / 1e12:.1f} TFLOP/s")
    print("| what | tok/s | bound | fraction |\n|---|---|---|---|")
    for B in (1, 8, 64) if device.type != "cpu" else (1, 8):
        prompts = torch.randint(0, config.vocab_size, (B, 16), generator=torch.Generator().manual_seed(B)).tolist()
        for compile in (False, True):
            stats = median_decode(model, prompts, steps, compile)
            rate, bound = stats["decode_tokens"] / stats["decode_s"], bandwidth / stats["step_bytes"] * B
            print(f"| decode, batch {B}, {'compiled' if compile else 'eager'} | {rate:.0f} | {bound:.0f} "
                  f"({stats['step_bytes'] / 1e9:.2f} GB/step) | {rate / bound:.0%} |")
    T = 2048 if device.type != "cpu" else 256
    ids = torch.randint(0, config.vocab_size, (1, T), device=device)
    with torch.no_grad():
        seconds = measure.timed(lambda: model(ids, last_only=True), sync)
    fraction = prefill_flops(model, T) / seconds / flops
    print(f"| prefill, {T} tokens | {T / seconds:.0f} | matmul peak | {fraction:.0%} |")
    if device.type == "cpu":
        speed = quantized_speed_check()
        print_results(speed)
        results += speed
    failed = [what for what, ok, _ in results if not ok]
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed")
    return not failed


def print_results(results):
    for what, ok, detail in results:
        print(f"{'ok  ' if ok else 'FAIL'} {what}: {detail}")


def quantized_speed_check():
    """The speed half of --check on a CPU: each quantized precision, compiled, must decode at batch 1 at least as
    fast as bf16 compiled on this machine (quantized() on a random 2-layer checkpoint of OLMoE-1B-7B's shape, written
    to a temporary folder, 2 GB); returns a (what, ok, detail) per precision."""
    import tempfile

    print()
    with tempfile.TemporaryDirectory() as tmp:
        rates = quantized(Path(tmp), batches=(1,), steps=32, transformers=False)
    base, results = rates["bf16 compiled", 1], []
    for kind in ("int8", "int8-dynamic", "int4"):
        rate = rates[f"{kind} compiled", 1]
        results.append((f"{kind} compiled decodes at least as fast as bf16 compiled, batch 1", rate >= base,
                        f"{rate / base:.2f}x bf16"))
    return results


# --------------------------------------------------------------------------------------------------------------
# Against transformers


def benchmark(shape, device, batches, steps, prompt_len, reference=False):
    import transformers

    device = torch.device(device)
    dtype = native_dtype_of(device) if device.type != "cpu" else torch.float32
    sync = measure.synchronizer(device)
    bandwidth, flops = device_ceilings(device, dtype)
    config = SHAPES[shape]()
    hf, ours = twin_models(config, device, dtype, reference)
    print(f"{shape} on {devices.device_name(device)}, {dtype}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}; measured copy bandwidth {bandwidth / 1e9:.0f} GB/s, matmul "
          f"{flops / 1e12:.1f} TFLOP/s")
    print("| what | this project | transformers | ratio | this project, fraction of bound |")
    print("|---|---|---|---|---|")
    # transformers compiles its decode step itself with a static cache, on a CPU only when told to
    compile_config = transformers.CompileConfig()
    compile_config._compile_all_devices = True
    for B in batches:
        g = torch.Generator().manual_seed(B)
        prompts = torch.randint(0, config.vocab_size, (B, 16), generator=g, device="cpu").tolist()
        ids = torch.tensor(prompts, device=device)
        for compile in [False, True]:
            stats = median_decode(ours, prompts, steps, compile)
            ours_rate = stats["decode_tokens"] / stats["decode_s"]
            bound = bandwidth / stats["step_bytes"] * B  # tokens/s if each step only read its bytes, at copy speed
            kw = dict(cache_implementation="static", compile_config=compile_config) if compile else {}
            hf_gen = lambda n: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,  # noqa: E731
                                           min_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
            hf_s = measure.timed(lambda: hf_gen(steps), sync) - measure.timed(lambda: hf_gen(1), sync)
            hf_rate = B * (steps - 1) / hf_s
            label = f"decode tok/s, batch {B}, {'compiled' if compile else 'eager'}"
            print(f"| {label} | {ours_rate:.1f} | {hf_rate:.1f} | {ours_rate / hf_rate:.2f}x | "
                  f"{ours_rate / bound:.0%} of {bound:.0f} ({stats['step_bytes'] / 1e9:.3f} GB/step) |")
    ids = torch.randint(0, config.vocab_size, (1, prompt_len), device=device)
    with torch.no_grad():
        ours_s = measure.timed(lambda: ours(ids, last_only=True), sync)
        hf_s = measure.timed(lambda: hf(ids, logits_to_keep=1, use_cache=False), sync)
    print(f"| prefill tok/s, {prompt_len} tokens | {prompt_len / ours_s:.0f} | {prompt_len / hf_s:.0f} | "
          f"{hf_s / ours_s:.2f}x | {prefill_flops(ours, prompt_len) / ours_s / flops:.0%} of matmul peak |")


# --------------------------------------------------------------------------------------------------------------
# Training: one optimizer step against transformers'


def training_step(config, device, dtype, *, batch=16, seq_len=128, repeat=7, reference=False):
    """One forward + backward + AdamW step of the same model on the same batch, as train.py takes it (float32 master
    weights, bf16 autocast when dtype is bf16): this project (cross-entropy plus 0.01 x transformers' load-balancing
    loss, its .loss) against transformers' OlmoeForCausalLM with output_router_logits=True (the same loss). The two
    take turns, so a slow moment of a shared machine falls on both; each figure is the median of `repeat` steps
    after a warm-up one. Prints one markdown row."""
    device = torch.device(device)
    sync = measure.synchronizer(device)
    flops_peak = device_ceilings(device, dtype)[1]
    hf, ours = twin_models(config, device, torch.float32, reference)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    losses = {"this project": lambda: ours(ids, ids).loss,
              "transformers": lambda: hf(ids, labels=ids, output_router_logits=True).loss}
    with torch.no_grad():  # the same weights give the same loss: the two steps do the same work
        a, b = (f().item() for f in losses.values())
    assert abs(a - b) < 1e-3 * abs(b), (a, b)
    def seconds_of_a_step(loss, opt):
        sync()
        t = time.perf_counter()
        with autocast:
            loss().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t

    steps = {}
    for (name, loss), model in zip(losses.items(), (ours, hf)):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)
        steps[name] = lambda loss=loss, opt=opt: seconds_of_a_step(loss, opt)
    seconds = taking_turns(steps, repeat)
    tokens = batch * seq_len
    # 6 FLOPs per active parameter per token: the blocks' (with K of E experts) and lm_head's (every position).
    flops = 6 * measure.active_params(config) * tokens
    ours_s, hf_s = seconds["this project"], seconds["transformers"]
    print(f"| training step (forward + backward + AdamW), {batch} x {seq_len} tokens, {dtype_name(dtype)} | "
          f"{tokens / ours_s:.0f} tok/s | {tokens / hf_s:.0f} tok/s | {hf_s / ours_s:.2f}x | "
          f"{flops / ours_s / flops_peak:.0%} of matmul peak (MFU) |")


# --------------------------------------------------------------------------------------------------------------
# Quantized decoding: speed of bf16 / int8 / int4 in one run, on a random checkpoint of OLMoE's layer shape


def quantized(path: Path, batches=(1, 8), steps=48, repeat=3, group_size=128, reference=False, transformers=True):
    """Decode tokens/s of the same random bf16 checkpoint loaded as bf16, int8 and int4, eager and compiled,
    through generate.generate, and by transformers in bf16 when it is installed (and asked for). All the models
    stay loaded and take turns, so slow moments of a shared machine fall on all of them alike; each figure is the
    median of `repeat` runs after one warm-up (which compiles). Prints the table and returns {(row, batch): tok/s}.
    Beside llama.cpp, with memory and start-up: cpu()."""
    load_before = os.getloadavg()[0]
    if not (path / "config.json").is_file():
        write_random_checkpoint(olmoe_with_layers(2), path)
    models = {"bf16": with_fast_paths(olmoe.load_model(path, dtype=torch.bfloat16), reference)}
    for kind in ("int8", "int8-dynamic", "int4"):
        models[kind] = with_fast_paths(quantize.load_model(path, kind, dtype=torch.bfloat16, group_size=group_size),
                                       reference)
    c = models["bf16"].config

    def ours(model, compile):
        def rate(prompts):
            stats = {}
            gen.generate(model, prompts, steps, compile=compile, stats=stats)
            return stats["decode_tokens"] / stats["decode_s"]
        return rate

    rates_of = {f"{kind}{suffix}": ours(model, compile) for kind, model in models.items()
                for suffix, compile in (("", False), (" compiled", True))}
    try:  # the reference, when installed: transformers' own model of the same checkpoint, eager, bf16
        import transformers as hf_library
    except ImportError:
        hf_library = None
    if transformers and hf_library is not None:
        hf = hf_library.OlmoeForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()

        def hf_rate(prompts):  # new tokens after the first, over the time they took: as generate's stats count
            ids = torch.tensor(prompts)
            seconds = []
            for n in (steps, 1):
                t = time.perf_counter()
                hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                            do_sample=False, pad_token_id=0)
                seconds.append(time.perf_counter() - t)
            return len(prompts) * (steps - 1) / (seconds[0] - seconds[1])

        rates_of["transformers bf16"] = hf_rate
    rates = {}
    for B in batches:
        prompts = torch.randint(0, c.vocab_size, (B, 16), generator=torch.Generator().manual_seed(B)).tolist()
        medians = taking_turns({kind: lambda rate=rate: rate(prompts) for kind, rate in rates_of.items()}, repeat)
        rates.update({(kind, B): value for kind, value in medians.items()})
    print(f"{path}: OLMoE layer shape (D={c.hidden_size}, E={c.num_experts} x I={c.intermediate_size}, "
          f"K={c.num_experts_per_tok}, V={c.vocab_size}), {c.num_hidden_layers} layers, random bf16 weights; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; {steps} new tokens after a 16-token "
          f"prompt, median of {repeat}; int4 group size {group_size}; load average before / after: "
          f"{load_before:.2f} / {os.getloadavg()[0]:.2f}")
    print("| weights | " + " | ".join(f"batch {B} tok/s | vs bf16" for B in batches) + " |")
    print("|---|" + "---|---|" * len(batches))
    for kind in rates_of:
        base = "bf16 compiled" if kind.endswith("compiled") else "bf16"
        cells = [f"{rates[kind, B]:.1f} | {rates[kind, B] / rates[base, B]:.2f}x" for B in batches]
        print(f"| {kind} | " + " | ".join(cells) + " |")
    return rates


def row_products(out=2048, inp=2048, rows=1, eager=False, copies=32, repeat=5):
    """Each product the CPU rules choose between for `rows` rows (1: a batch-1 decode step's, compiled; from
    quantize.INT8_CAST_ROWS on, int8's weight cast and F.linear too, as a prefill's, eager), on `copies` random
    weights of (out, inp) taken in turn, so that they come from memory, not the cache: microseconds a product, the
    median of `repeat` turns, and the weight bytes read a second."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, inp, dtype=torch.bfloat16, generator=g)
    bf16 = [torch.randn(out, inp, generator=g).bfloat16() for _ in range(copies)]
    int8 = [torch.randint(-127, 128, (out, inp), dtype=torch.int8, generator=g) for _ in range(copies)]
    int4 = [torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (out, inp), dtype=torch.int32,
                                                                     generator=g), 1) for _ in range(copies)]
    scale, sz = torch.rand(out, dtype=torch.bfloat16) / 100, torch.rand(inp // 128, out, 2, dtype=torch.bfloat16)
    products = {"bf16 F.linear": (lambda w: F.linear(x, w), bf16), "bf16 gemv": (lambda w: fast.gemv(x, w), bf16),
                "int8 _weight_int8pack_mm": (lambda w: torch._weight_int8pack_mm(x, w, scale), int8),
                "int8 reduction over bytes": (lambda w: quantize.int8_reduction(x, w, scale), int8),
                "int8 reduction over int32 words": (lambda w: quantize.int8_words(x, w, scale), int8),
                "int8 cast, F.linear": (lambda w: quantize.int8_linear(x, w, scale, None), int8),
                "int4 _weight_int4pack_mm_for_cpu": (lambda w: torch._weight_int4pack_mm_for_cpu(x, w, 128, sz), int4)}
    one_row = {"bf16 gemv", "int8 reduction over bytes", "int8 reduction over int32 words"}
    products = {k: v for k, v in products.items() if rows == 1 or k not in one_row}
    if not eager:
        products = {name: (torch.compile(f, dynamic=False), ws) for name, (f, ws) in products.items()}

    def one_pass(f, ws):  # seconds a product, over one pass through the weights
        t = time.perf_counter()
        for w in ws:
            f(w)
        return (time.perf_counter() - t) / len(ws)

    seconds = taking_turns({name: lambda f=f, ws=ws: one_pass(f, ws) for name, (f, ws) in products.items()}, repeat)
    print(f"{rows} rows by ({out}, {inp}), {'eager' if eager else 'compiled'}, {copies} weights in turn; CPU class "
          f"{fast.CPU_CLASS} ({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| product | us | weight GB/s |\n|---|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {s * 1e6:.0f} | {products[name][1][0].nbytes / s / 1e9:.1f} |")


def olmoe_with_layers(n):
    """OLMoE-1B-7B's config with n layers: every layer, the vocabulary and so every kernel as in the real one."""
    config = olmoe.PRESETS["OLMoE-1B-7B-0924"]()
    config.num_hidden_layers = n
    return config


def cpu_one(path, kind, steps, prompt_len, reference=False):
    """The body of one fresh process of cpu(): load `path` as kind (bf16, int8 or int4), time the first compiled
    call (compiling included), then compiled decoding at batch 1 and 8 (median of 3 runs after a warm-up) and an
    eager prefill of prompt_len tokens. Prints weight bytes, peak RSS before loading and at the end (compiling
    included), the first call's seconds, the three rates."""
    cpu = torch.device("cpu")
    before = measure.peak_memory(cpu)
    model = with_fast_paths(olmoe.load_model(path) if kind == "bf16" else quantize.load_model(path, kind), reference)
    weights = sum(t.nbytes for t in model.state_dict().values())
    t = time.perf_counter()
    gen.generate(model, [[1] * 16], steps, compile=True)
    first = time.perf_counter() - t

    def rate(prompts, compile=True):
        stats = {}
        gen.generate(model, prompts, steps if compile else 1, compile=compile, stats=stats)
        return stats["decode_tokens"] / stats["decode_s"] if compile else stats["prefill_tokens"] / stats["prefill_s"]

    def prompts(B):  # different tokens in each row, so the rows choose different experts, as real ones do
        return torch.randint(0, model.config.vocab_size, (B, 16), generator=torch.Generator().manual_seed(B)).tolist()

    decode = [taking_turns({B: lambda B=B: rate(prompts(B))}, 3)[B] for B in (1, 8)]  # the median of 3
    prefill = taking_turns({0: lambda: rate([[1] * prompt_len], compile=False)}, 1)[0]
    print(weights, before, measure.peak_memory(cpu), first, *decode, prefill)


def cpu(workdir: Path, *, llama_root=None, layers=(2, 16), kinds=tuple(llama_cpp.KINDS), steps=32, prompt_len=512,
        reference=False):
    """This project on a CPU at each of kinds (bf16, int8, int8-dynamic, int4), on random checkpoints of OLMoE-1B-7B's
    shape with 2 layers and with all 16 (written once into workdir: 2 and 14 GB), beside llama.cpp's type of the same
    bits (llama_cpp.KINDS) on the same checkpoints given a llama.cpp build. Each precision is measured twice, in fresh
    processes sharing one new inductor cache directory: the first call compiles from nothing, the second finds the
    cache. Peak RSS is the process's own. llama-bench runs just before and just after ours, and each side's better run
    is compared, so a slow moment of a shared machine shows as a gap between the two runs of one side, not as a
    ratio."""
    import tempfile

    print(f"{workdir}: OLMoE-1B-7B's layer shape, random bf16 weights; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {steps} new tokens after a 16-token prompt; a {prompt_len}-token "
          f"prefill, eager; load average {os.getloadavg()[0]:.2f} at the start")
    print(f"| layers | weights | weight bytes | peak RSS less PyTorch's own | decode tok/s, batch 1, 1st / 2nd process "
          f"| llama.cpp tg{steps}, before / after | ratio | batch 8 | prefill tok/s | llama.cpp pp{prompt_len}, "
          f"before / after | ratio | first compiled call, s, cold / warm cache |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    plain = False
    for n in layers:
        path = workdir / f"olmoe-{n}-layers"
        if not (path / "config.json").is_file():
            write_random_checkpoint(olmoe_with_layers(n), path)
        gguf = llama_cpp.gguf_files(llama_root, path, kinds) if llama_root else {}
        for kind in kinds:
            llama = [llama_cpp.bench(llama_root, gguf[kind], steps, prompt_len)] if llama_root else []
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="inductor-"))
            runs = []
            for _ in range(2):  # the first compiles from nothing; the second finds the cache the first wrote
                code = f"import sys, torch, benchmark; torch.set_num_threads({torch.get_num_threads()}); " \
                       f"benchmark.cpu_one(sys.argv[1], sys.argv[2], {steps}, {prompt_len}, {reference})"
                r = subprocess.run([sys.executable, "-c", code, str(path), kind], capture_output=True, text=True,
                                   check=True, env=env)
                runs.append(list(map(float, r.stdout.split())))
            llama += [llama_cpp.bench(llama_root, gguf[kind], steps, prompt_len)] if llama_root else []
            weights, before, peak = max(runs, key=lambda r: r[2])[:3]
            decode, batch8, prefill = (max(r[i] for r in runs) for i in (4, 5, 6))
            tg, pp = (max(x[i] for x in llama) for i in (0, 1)) if llama else (None, None)
            runs_of = " / ".join
            print(f"| {n} | {kind} / {llama_cpp.KINDS[kind]} | {weights / 1e9:.2f} GB | {(peak - before) / 1e9:.2f} GB "
                  f"({(peak - before) / weights:.2f}x) | {runs_of(f'{r[4]:.1f}' for r in runs)} | "
                  f"{runs_of(f'{x[0]:.1f}' for x in llama) or '-'} | {ratio(decode, tg)} | {batch8:.1f} | "
                  f"{prefill:.0f} | {runs_of(f'{x[1]:.0f}' + '*' * x[2] for x in llama) or '-'} | "
                  f"{ratio(prefill, pp)} | {runs_of(f'{r[3]:.1f}' for r in runs)} |", flush=True)
            plain = plain or any(x[2] for x in llama)
    if plain:
        print("\n* llama.cpp's prefill with --repack 0: with its repacked layout it died by a signal (llama_cpp.bench)")


def ratio(a, b):
    return f"{a / b:.2f}x" if b else "-"


# --------------------------------------------------------------------------------------------------------------
# Accuracy: per-layer weight error and logit error, on a small OLMoE initialised as transformers does


def weight_errors(model_path, group_size=128):
    """Relative Frobenius error |w - dequantize(quantize(w))| / |w| of each quantized weight, for int8 and int4,
    summarised per kind of layer as (mean, max) over layers and experts."""
    from safetensors.torch import load_file

    errors = {}
    for file in sorted(model_path.glob("*.safetensors")):
        for name, w in load_file(file).items():
            if w.dim() != 2 or "embed_tokens" in name or name.endswith("mlp.gate.weight"):
                continue  # norms, the embedding and the router stay in float
            kind = name.split(".")[-2]  # q_proj, ..., gate_proj / up_proj / down_proj (experts), lm_head
            for bits in (8, 4, "4-clip"):
                back = quantize.dequantize(*quantize.quantize(w, 4 if bits == "4-clip" else bits, group_size,
                                            clip_search=bits == "4-clip"), torch.float32)
                err = (back - w.float()).norm() / w.float().norm()
                errors.setdefault((kind, bits), []).append(err.item())
    return {k: (sum(v) / len(v), max(v)) for k, v in errors.items()}


def precisions(path, group_size):
    """The checkpoint at each precision the reports compare: name -> a function that loads it."""
    return {"bf16": lambda: olmoe.load_model(path, dtype=torch.bfloat16),
            "int8": lambda: quantize.load_model(path, "int8", dtype=torch.bfloat16),
            "int8-dynamic": lambda: quantize.load_model(path, "int8-dynamic", dtype=torch.bfloat16),
            "int4": lambda: quantize.load_model(path, "int4", dtype=torch.bfloat16, group_size=group_size),
            "int4, clip_search": lambda: quantize.load_model(path, "int4", dtype=torch.bfloat16,
                                                             group_size=group_size, clip_search=True)}


def bits_per_byte(checkpoint: Path, texts: dict, context, group_size=128):
    """What quantizing costs a trained model: each text's bits per byte (evaluate.py's engine, in windows of
    `context` tokens, each later one predicted from at least context/2 before it) under the checkpoint's weights in
    float32, bf16, int8, int4, and int4 with clip_search. Prints one markdown table."""
    import evaluate

    tokenizer, eos, _ = checkpoints.load_tokenizer(checkpoint)
    load = {"float32": lambda: olmoe.load_model(checkpoint, dtype=torch.float32), **precisions(checkpoint, group_size)}
    prefix = min(eos) if eos else None  # evaluate.py's rolling log-likelihood starts after an eos, where there is one
    windows = {name: evaluate.text_windows(tokenizer.encode(t, add_special_tokens=False).ids, context, prefix)
               for name, t in texts.items()}
    sizes = ", ".join(f"{n} ({len(t.encode()) / 1e3:.0f} kB)" for n, t in texts.items())
    print(f"{checkpoint}: bits per byte of {sizes}, windows of {context} tokens; int4 group size {group_size}; "
          "activations in bf16 but for float32")
    print("| weights | " + " | ".join(texts) + " | mean | vs bf16 |\n|---|" + "---|" * (len(texts) + 2))
    base = None
    for kind, make in load.items():
        model = make()
        bpb = []
        for name, pairs in windows.items():
            scored, _ = evaluate.score(model, pairs)
            bpb.append(evaluate.text_scores(texts[name], [scored[i] for i in range(len(pairs))])["bits_per_byte"])
        mean = sum(bpb) / len(bpb)
        base = mean if kind == "bf16" else base
        change = f"{(mean - base) / base:+.2%}" if base else "—"
        print(f"| {kind} | " + " | ".join(f"{b:.4f}" for b in bpb) + f" | {mean:.4f} | {change} |")


def accuracy(workdir: Path, steps=64, group_size=128, real_width=False):
    """What quantizing costs a random OLMoE, against the same weights in float32: each layer's weight error and the
    logits' error, on a small OLMoE or (real_width) on OLMoE-1B-7B's shape with 2 layers, random_model's weights."""
    path = workdir / ("olmoe-2-layers-float32" if real_width else "small-OLMoE")
    if real_width and not (path / "config.json").is_file():
        write_random_checkpoint(olmoe_with_layers(2), path, dtype=torch.float32)
    elif not (path / "config.json").is_file():
        import transformers

        torch.manual_seed(0)
        hf_config = transformers.OlmoeConfig(vocab_size=50304, hidden_size=512, intermediate_size=256,
                                             num_hidden_layers=4, num_attention_heads=8, num_experts=64,
                                             num_experts_per_tok=8)
        transformers.OlmoeForCausalLM(hf_config).save_pretrained(path)
    c = olmoe.read_config(path)
    print(f"{path}: {'OLMoE-1B-7B' if real_width else 'small OLMoE'} (D={c.hidden_size}, {c.num_hidden_layers} "
          f"layers, {c.num_experts} experts of width {c.intermediate_size}, top-{c.num_experts_per_tok}, "
          f"V={c.vocab_size}), float32 weights ~ N(0, 0.02); int4 group size {group_size}")
    print("\nWeight reconstruction, relative Frobenius error |w - w_q| / |w|, mean / max over layers (and experts)")
    print("| layer | int8 | int4 | int4, clip_search=True |\n|---|---|---|---|")
    errors = weight_errors(path, group_size)
    for kind in dict.fromkeys(k for k, _ in errors):
        print(f"| {kind} | " + " | ".join(f"{errors[kind, b][0]:.4f} / {errors[kind, b][1]:.4f}"
                                         for b in (8, 4, "4-clip")) + " |")

    prompt = torch.randint(0, 50000, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    f32 = olmoe.load_model(path, dtype=torch.float32)
    greedy = gen.generate(f32, [prompt], steps)[0]
    ids = torch.tensor([prompt + greedy])
    models = {kind: load() for kind, load in precisions(path, group_size).items()}
    with torch.no_grad():
        logits = {k: m(ids).logits[0, len(prompt) - 1:-1].float() for k, m in {"float32": f32, **models}.items()}
    print(f"\nLogits over {steps} greedy (float32) tokens after a 16-token prompt, teacher-forced; bf16 activations")
    print("| weights | relative logit error vs bf16, mean / max over positions | vs float32 | "
          "same argmax as bf16 |\n|---|---|---|---|")
    for kind in models:
        row = []
        for ref in ("bf16", "float32"):
            rel = (logits[kind] - logits[ref]).norm(dim=-1) / logits[ref].norm(dim=-1)  # (steps,)
            row.append(f"{rel.mean():.4f} / {rel.max():.4f}")
        agree = (logits[kind].argmax(-1) == logits["bf16"].argmax(-1)).float().mean()
        print(f"| {kind} | {row[0]} | {row[1]} | {agree:.1%} |")


# --------------------------------------------------------------------------------------------------------------
# Command line: each subcommand's parser names the function that runs it (set_defaults)


def run_check(args):
    raise SystemExit(0 if check(devices.pick_device(args.device)) else 1)


def run_speed(args):
    benchmark(args.shape, devices.pick_device(args.device), args.batch, args.steps, args.prompt_len, args.reference)


def run_train(args):
    device = devices.pick_device(args.device)
    dtype = devices.training_dtype(args.dtype, device)
    print(f"# {args.shape} on {devices.device_name(device)}, torch {torch.__version__}")
    print("| what | this project | transformers | ratio | this project, MFU |\n|---|---|---|---|---|")
    training_step(SHAPES[args.shape](), device, dtype, batch=args.batch, seq_len=args.seq_len,
                  reference=args.reference)


def run_quantized(args):
    quantized(args.dir, args.batch, args.steps, group_size=args.group_size or 128, reference=args.reference)


def run_rows(args):
    row_products(*args.shape, rows=args.rows, eager=args.eager, copies=args.copies)


def run_cpu(args):
    cpu(args.dir, llama_root=args.llama_cpp, layers=args.layers, kinds=args.kinds, reference=args.reference)


def run_accuracy(args):
    accuracy(args.dir, group_size=args.group_size or 128, real_width=args.real_width)


def run_bpb(args):
    texts = text.read_texts(args.text)
    path = checkpoints.checkpoint_dir(str(args.checkpoint))
    config = olmoe.read_config(path)
    context = args.context or checkpoints.trained_seq_len(path) or config.max_position_embeddings
    bits_per_byte(path, texts, context, group_size=args.group_size or quantize.int4_group_size(config))


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="self-check this device (about a minute on a GPU)")
    c.add_argument("--device", default=None, help="default: cuda, else mps, else cpu")
    s = sub.add_parser("speed", help="decoding and prefill against transformers, the same random weights")
    s.add_argument("--shape", choices=SHAPES, default="OLMoE-1B-7B")
    s.add_argument("--device", default=None, help="default: cuda, else mps, else cpu")
    s.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    s.add_argument("--steps", type=int, default=64, help="tokens generated per decode measurement")
    s.add_argument("--prompt-len", type=int, default=2048, help="tokens in the prefill measurement")
    t = sub.add_parser("train", help="one forward + backward + AdamW step against transformers, the same weights")
    t.add_argument("--shape", choices=SHAPES, default="olmoe-cpu")
    t.add_argument("--device", default=None, help="default: cuda, else mps, else cpu")
    t.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: bfloat16 where native (CUDA sm80+), else float32, as train.py")
    t.add_argument("--batch", type=int, default=16, help="sequences per step")
    t.add_argument("--seq-len", type=int, default=128)
    q = sub.add_parser("quantized", help="decode speed of bf16 / int8 / int4 on a random 2-layer checkpoint of "
                                         "OLMoE-1B-7B's layer shape in DIR (written if absent)")
    q.add_argument("dir", type=Path)
    q.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    q.add_argument("--steps", type=int, default=48, help="new tokens per decode measurement")
    r = sub.add_parser("rows", help="a compiled decode row (or --rows N) through each product a CPU rule picks from")
    r.add_argument("--shape", type=int, nargs=2, default=[2048, 2048], metavar=("OUT", "IN"))
    r.add_argument("--rows", type=int, default=1, help="rows of activations (1: a decode step's)")
    r.add_argument("--eager", action="store_true", help="not compiled (a prefill runs eager)")
    r.add_argument("--copies", type=int, default=32, help="weights taken in turn, so that they come from memory")
    m = sub.add_parser("cpu", help="speed, peak memory and start-up at bf16 / int8 / int4 of random checkpoints of "
                                   "OLMoE-1B-7B's shape with 2 and 16 layers in DIR (written if absent: 16 GB)")
    m.add_argument("dir", type=Path)
    m.add_argument("--llama-cpp", type=Path, default=None, metavar="LLAMA_CPP_DIR",
                   help="a llama.cpp source tree built into LLAMA_CPP_DIR/build (docs/performance.md): add its BF16 / "
                        "Q8_0 / Q4_0 speed on the same checkpoints")
    m.add_argument("--layers", type=int, nargs="+", default=[2, 16])
    m.add_argument("--kinds", nargs="+", choices=llama_cpp.KINDS, default=list(llama_cpp.KINDS))
    a = sub.add_parser("accuracy", help="weight and logit error of int8 / int4 on a small random OLMoE in DIR")
    a.add_argument("dir", type=Path)
    a.add_argument("--real-width", action="store_true", help="OLMoE-1B-7B's shape with 2 layers in place of the "
                   "small OLMoE (a 4 GB float32 checkpoint)")
    b = sub.add_parser("bpb", help="bits per byte of texts under a trained checkpoint's float32, bf16, int8 and int4 "
                                   "weights")
    b.add_argument("checkpoint", help="a checkpoint, or a train.py run's directory (its latest checkpoint)")
    b.add_argument("--text", action="append", required=True, metavar="NAME=FILE")
    b.add_argument("--context", type=int, default=None, help="tokens per window (default: the sequence length a "
                   "train.py checkpoint was trained on, else the model's context)")
    for parser_, run in ((c, run_check), (s, run_speed), (t, run_train), (q, run_quantized), (r, run_rows),
                         (m, run_cpu), (a, run_accuracy), (b, run_bpb)):
        parser_.set_defaults(run=run)
    for parser_ in (q, r, m, a, b):
        parser_.add_argument("--threads", type=int, default=2)
    for parser_ in (s, t, q, m):
        parser_.add_argument("--reference", action="store_true", help="olmoe.py's plain modules, without fast.py")
    for parser_ in (q, a, b):
        parser_.add_argument("--group-size", type=int, default=None, help="inputs per int4 scale (default: the "
                             "largest of 128, 64 and 32 that divides every layer)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if getattr(args, "threads", None):  # the CPU measurements': 2 by default, the cores of this project's machines
        torch.set_num_threads(args.threads)
    return args.run(args)


if __name__ == "__main__":
    main()
