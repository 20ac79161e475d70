"""Speed against transformers, and a one-minute self-check of your own GPU.

    python benchmark.py --check                  # any device: is every path right here, and how fast?
    python benchmark.py --shape OLMoE-1B-7B      # this project against transformers, same random weights

Both build models of random weights (no download). --check compares this device with the CPU on small models
(float32 logits, the native dtype's logits, compiled against eager tokens, every MoE path against the naive
dispatch), then times the OLMoE-1B-7B layer shape and prints each figure as a fraction of its bound: the bytes a
decode step must read over the measured copy bandwidth, or a prefill's FLOPs over the measured matmul rate.
"""

import argparse
import time

import torch

import generate as gen
import olmoe

SHAPES = {  # the released shapes, and small ones of the same kind for a CPU
    "OLMoE-1B-7B": lambda: olmoe.PRESETS["OLMoE-1B-7B-0924"](),
    "OLMo-2-1B": lambda: olmoe.PRESETS["OLMo-2-0425-1B"](),
    "small-OLMoE": lambda: olmoe.OlmoeConfig(hidden_size=512, intermediate_size=256, num_hidden_layers=4,
                                             num_attention_heads=8, num_experts=64, num_experts_per_tok=8),
    "small-OLMo-2": lambda: olmoe.Olmo2Config(vocab_size=100352, hidden_size=512, intermediate_size=2048,
                                              num_hidden_layers=4, num_attention_heads=8),
}


def timed(fn, sync, repeat=3):
    """Median wall time of fn() over repeat runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def median_decode(model, prompts, steps, compile):
    """generate()'s stats of the median of three runs, after one that warms up (and compiles)."""
    runs = [{} for _ in range(4)]
    for stats in runs:
        gen.generate(model, prompts, steps, compile=compile, stats=stats)
    return sorted(runs[1:], key=lambda s: s["decode_s"])[1]


def device_ceilings(device, dtype, sync):
    """Measured copy bandwidth (bytes read + written per second) and matmul rate in dtype (FLOP/s)."""
    n = 2**28  # 256 MB: larger than any cache, so the copy streams from memory
    a, b = torch.empty(n, dtype=torch.uint8, device=device).random_(), torch.empty(n, dtype=torch.uint8, device=device)
    bandwidth = 2 * n / timed(lambda: b.copy_(a), sync, repeat=10)
    m = 8192 if device.type != "cpu" else 1024
    x, y = torch.randn(m, m, device=device, dtype=dtype), torch.randn(m, m, device=device, dtype=dtype)
    return bandwidth, 2 * m**3 / timed(lambda: x @ y, sync, repeat=10)


def random_model(config, device, dtype, seed=0):
    """This project's model of config with random weights (norms 1, the rest N(0, 0.02)), built on the device."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = olmoe.Transformer(config)
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
    return model.eval()


def twin_models(config, device, dtype):
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
    return hf, ours.eval()


def active_params(model):
    """Parameters one prefill token multiplies: the layers', with K of the E experts (only the last position
    reaches lm_head, and the embedding is a lookup)."""
    c, n = model.config, 0
    for name, p in model.named_parameters():
        if name.startswith("model.layers"):
            n += p.numel() * (c.num_experts_per_tok / c.num_experts if "experts" in name else 1)
    return n


def prefill_flops(model, T):
    """Matmul FLOPs of a T-token prefill: the weights', and causal attention's (half of QK^T and AV)."""
    c = model.config
    return 2 * T * active_params(model) + 2 * c.num_hidden_layers * T**2 * c.num_attention_heads * c.head_dim


def native_dtype_of(device):
    return gen.native_dtype(device, torch.bfloat16)[0]


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def device_name(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (sm{''.join(map(str, torch.cuda.get_device_capability(device)))})"
    return f"CPU ({torch.get_num_threads()} threads)" if device.type == "cpu" else device.type.upper()


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
        cpu = random_model(config, torch.device("cpu"), torch.float32)
        with torch.no_grad():
            ref = cpu(ids).logits
            here = random_model(config, device, torch.float32)
            err = (here(ids.to(device)).logits.cpu() - ref).abs().max().item()
            results.append((f"{name} float32 logits == CPU", err < 1e-4, f"max |error| {err:.1e}"))
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
        for path, fn in olmoe.MOE_PATHS.items():
            rel = ((fn(x, top_w, top_i, moe.experts).float() - ref).norm() / ref.norm()).item()
            results.append((f"MoE path {path} == naive, {N} tokens", rel < 2e-2, f"relative error {rel:.1e}"))
    return results


def check(device, steps=32):
    device = torch.device(device)
    dtype, sync = native_dtype_of(device), gen.synchronizer(device)
    print(f"# self-check on {device_name(device)}, torch {torch.__version__}")
    results = check_paths(device)
    for what, ok, detail in results:
        print(f"{'ok  ' if ok else 'FAIL'} {what}: {detail}")
    facts = olmoe.device_facts(device)
    print("MoE path here: " + ", ".join(f"{N} tokens {'compiled' if c else 'eager'} -> "
                                        f"{olmoe.moe_path(*facts, dtype, c, N, 8, 64)}"
                                        for N in (1, 8, 64, 2048) for c in (False, True)))

    # Speed: the OLMoE-1B-7B layer shape with 4 of its 16 layers (per-token figures scale with the layers).
    bandwidth, flops = device_ceilings(device, dtype, sync)
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
        seconds = timed(lambda: model(ids, last_only=True), sync)
    fraction = prefill_flops(model, T) / seconds / flops
    print(f"| prefill, {T} tokens | {T / seconds:.0f} | matmul peak | {fraction:.0%} |")
    failed = [what for what, ok, _ in results if not ok]
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed")
    return not failed


# --------------------------------------------------------------------------------------------------------------
# Against transformers


def benchmark(shape, device, batches, steps, prompt_len):
    import transformers

    device = torch.device(device)
    dtype = native_dtype_of(device) if device.type != "cpu" else torch.float32
    sync = gen.synchronizer(device)
    bandwidth, flops = device_ceilings(device, dtype, sync)
    config = SHAPES[shape]()
    hf, ours = twin_models(config, device, dtype)
    print(f"{shape} on {device_name(device)}, {dtype}; torch {torch.__version__}, transformers "
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
            hf_rate = B * (steps - 1) / (timed(lambda: hf_gen(steps), sync) - timed(lambda: hf_gen(1), sync))
            label = f"decode tok/s, batch {B}, {'compiled' if compile else 'eager'}"
            print(f"| {label} | {ours_rate:.1f} | {hf_rate:.1f} | {ours_rate / hf_rate:.2f}x | "
                  f"{ours_rate / bound:.0%} of {bound:.0f} ({stats['step_bytes'] / 1e9:.3f} GB/step) |")
    ids = torch.randint(0, config.vocab_size, (1, prompt_len), device=device)
    with torch.no_grad():
        ours_s = timed(lambda: ours(ids, last_only=True), sync)
        hf_s = timed(lambda: hf(ids, logits_to_keep=1, use_cache=False), sync)
    print(f"| prefill tok/s, {prompt_len} tokens | {prompt_len / ours_s:.0f} | {prompt_len / hf_s:.0f} | "
          f"{hf_s / ours_s:.2f}x | {prefill_flops(ours, prompt_len) / ours_s / flops:.0%} of matmul peak |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="self-check this device (about a minute on a GPU)")
    p.add_argument("--shape", choices=SHAPES, default="OLMoE-1B-7B")
    p.add_argument("--device", default=None, help="default: cuda, else mps, else cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--steps", type=int, default=64, help="tokens generated per decode measurement")
    p.add_argument("--prompt-len", type=int, default=2048, help="tokens in the prefill measurement")
    a = p.parse_args()
    device = gen.pick_device(a.device)
    if a.check:
        raise SystemExit(0 if check(device) else 1)
    benchmark(a.shape, device, a.batch, a.steps, a.prompt_len)


if __name__ == "__main__":
    main()
