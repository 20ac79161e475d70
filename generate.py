"""Generate text with OLMoE or OLMo2: python generate.py --prompt "Once upon a time"

argparse -> load the checkpoint and tokenizer, with fast.py's kernels unless --reference -> generate() -> print.
Text goes to stdout, statistics to stderr. generate() fills a KV cache allocated once with the prompt (prefill), then
takes one decode step per token (decode_one_token), as gpt-fast's generate.py; it works on token ids and is what a
notebook imports. Everything here is a function, nothing is global.
"""

import argparse
import sys
import time
import types

import torch
import torch.nn.functional as F

import checkpoints
import cli
import devices
import fast
import measure
import olmoe

def sample(logits, *, temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """Pick one token per row of logits (B, V). temperature 0 is greedy; top_k keeps the k likeliest tokens
    (0: all); top_p keeps the smallest set whose probability reaches p. A pure function of its arguments."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        before = sorted_logits.softmax(dim=-1).cumsum(dim=-1) - sorted_logits.softmax(dim=-1)  # mass ranked above
        sorted_logits = sorted_logits.masked_fill(before >= top_p, -float("inf"))  # the top token always stays
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def bytes_per_decode_step(model, B, S, experts_hit):
    """Bytes one decode step reads: every weight but the embedding table (of which it reads B rows) and the
    experts, then only the experts_hit experts some row was routed to, and the whole KV cache (attention runs
    over all S slots, the mask hiding the unwritten ones)."""
    c, weights = model.config, model.state_dict()
    total = sum(t.nbytes for name, t in weights.items() if "experts" not in name and "embed_tokens" not in name)
    size = weights["model.embed_tokens.weight"].element_size()  # activations' and KV cache's dtype too
    total += B * c.hidden_size * size + 2 * c.num_hidden_layers * B * c.num_key_value_heads * S * c.head_dim * size
    if experts_hit:
        stacked = sum(t.nbytes for name, t in weights.items() if "experts" in name)  # all layers, all experts
        total += experts_hit * stacked // (c.num_hidden_layers * c.num_experts)
    return total


class NonFiniteLogits(FloatingPointError):
    """The logits became inf or NaN: the activations overflowed the model's dtype."""


class KVCache(torch.nn.Module):
    """Keys and values of one layer for S slots, allocated once, as gpt-fast's: each new token's k, v are written at
    its slot, and attention runs over all S slots, with a mask hiding slots not yet written (and left padding)."""

    def __init__(self, B, Hkv, S, Dh, *, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(B, Hkv, S, Dh, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros(B, Hkv, S, Dh, dtype=dtype, device=device))

    def update(self, cache_pos, k, v):
        self.k[:, :, cache_pos] = k  # k: (B, Hkv, T, Dh) written at slots cache_pos (T,)
        self.v[:, :, cache_pos] = v
        return self.k, self.v  # (B, Hkv, S, Dh)


def new_cache(model, B, S):
    """One KVCache per layer of the model, for B rows of S slots, in the model's dtype and on its device."""
    c, p = model.config, model.model.embed_tokens.weight
    return [KVCache(B, c.num_key_value_heads, S, c.head_dim, dtype=p.dtype, device=p.device)
            for _ in range(c.num_hidden_layers)]


def prefill(model, ids, mask, pos, cache):
    """The prompts' tokens ids (B, T) in one call, into slots 0..T-1 of the cache: the last position's logits
    (B, V) in float32. mask (B, S) hides left padding; None when there is none, so attention takes its fastest
    kernel."""
    out = model(ids, attention_mask=mask, position_ids=pos, cache=cache, last_only=True)
    return out.logits[:, -1].float()


def decode_one_token(model, cache, mask, tokens, pos, slot):
    """One token per row: tokens, pos (B, 1) at cache slot (1,). Returns the logits (B, V) in float32 and, for
    OLMoE, the experts each row was routed to (L, B, K)."""
    out = model(tokens, attention_mask=mask, position_ids=pos, cache=cache, cache_pos=slot, last_only=True)
    routes = [r[:, -1].topk(model.config.num_experts_per_tok).indices for r in out.router_logits]  # L x (B, K)
    return out.logits[:, -1].float(), torch.stack(routes) if routes else None


def compiled_decoding(model, B, S):
    """The model's compiled decode step and the KV cache it writes, for B rows of S slots. Both are built once and
    kept beside the model (model.compiled_decoding), so later generate() calls of the same B and cache bucket
    compile nothing new; a new shape, dtype or device replaces the cache (and compiles once for it)."""
    p = model.model.embed_tokens.weight
    key = (B, S, p.dtype, p.device)
    kept = getattr(model, "compiled_decoding", None)
    if kept is not None and kept[0] == key:
        return kept[1], kept[2]
    cache = new_cache(model, B, S)
    for kv in cache:  # CUDA graphs read and write the cache in place, never through a copy
        torch._dynamo.mark_static_address(kv.k), torch._dynamo.mark_static_address(kv.v)
    # A fresh copy of decode_one_token's code for each model and shape: dynamo keeps compiled variants on the code
    # object, at most torch._dynamo.config.recompile_limit (8) of them, so one shared code object would stop
    # compiling after 8 models or shapes in a process. A copy's variants go with it when this one is replaced.
    fresh = types.FunctionType(decode_one_token.__code__.replace(), decode_one_token.__globals__, "decode_one_token")
    if p.device.type == "cuda":
        # Replay the step as a CUDA graph, and let inductor tune its kernels' tiling, which is what fuses the MoE
        # expert gather (and the int8 dequantization) into the matmuls, as gpt-fast's mixtral-moe does.
        step = torch.compile(fresh, dynamic=False,
                             options={"triton.cudagraphs": True, "coordinate_descent_tuning": True})
    else:
        # On a CPU, inductor's max_autotune with freezing (its C++ GEMM templates) decoded no faster than this
        # default and compiles longer (docs/performance.md). At decode sizes the experts read their ids with item()
        # (fast.moe_pairs): capture_scalar_outputs traces them.
        step = torch._dynamo.config.patch(capture_scalar_outputs=True)(torch.compile(fresh, dynamic=False))
    model.compiled_decoding = (key, cache, step)
    # Compile and record now, outside any timing, with inputs like the real ones, in the last slot: a real token
    # overwrites it before any query may attend it. CUDA graphs record on a later call than the first.
    zeros = torch.zeros(B, dtype=torch.long, device=p.device)[:, None]  # (B, 1), as the decode loop passes tokens
    for _ in range(3):
        step(model, cache, torch.ones(B, S, dtype=torch.bool, device=p.device), zeros, zeros + 1,
             torch.tensor([S - 1], device=p.device))
    return cache, step


def cache_slots(n, limit):
    """Slots for n tokens, rounded up to a power of two (at least 64, at most the context length), so that prompts
    and max_new_tokens of other lengths reuse the same compiled step."""
    return min(max(64, 1 << (n - 1).bit_length()), max(n, limit))


CHECK_EVERY = 16  # decode steps between looks at eos and overflow, each look a host sync


def check_arguments(config, prompts, max_new_tokens, temperature, top_k, top_p):
    """generate()'s arguments against their limits and the model's config: a ValueError naming the one that is off."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1 and top_k >= 0; got {temperature}, {top_p}, {top_k}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    T, context = max(map(len, prompts)), config.max_position_embeddings
    if T + max_new_tokens > context:
        raise ValueError(f"prompt ({T} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the context length "
                         f"of {context}")


def left_padded(prompts, S, device):
    """Prompts of different lengths as one batch, left-padded so that every row's last prompt token is at slot
    T-1: ids (B, T); mask (B, S), False on the padding slots; positions (B, T) that count only real tokens. So each
    row sees exactly what it would see alone."""
    B, T = len(prompts), max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + list(p) for p in prompts], device=device)  # (B, T)
    mask = torch.ones(B, S, dtype=torch.bool, device=device)
    mask[:, :T] = ids.new_tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts]).bool()  # (B, S)
    return ids, mask, mask[:, :T].long().cumsum(-1) - 1


def check_finite(model, finite, step):
    """A host sync: only every CHECK_EVERY steps, or when the caller streams anyway."""
    if not finite:
        dtype = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
        raise NonFiniteLogits(f"the logits overflowed to inf/NaN in {dtype} at step {step}: run in bfloat16 "
                              "(--dtype bfloat16) or float32")


def decode_tokens(model, token, *, decode, cache, mask, pos, slot, n, pick, eos, on_token):
    """After the first new token (B,) at positions pos (B, 1) and slot (1,), up to n - 1 more, one decode step
    each, until every row has given one of eos (1-D). Returns the tokens, each (B,), and the experts each step
    routed to (for the statistics)."""
    out, done, routes = [token], torch.isin(token, eos), []
    finite = torch.ones((), dtype=torch.bool, device=token.device)
    for step in range(1, n):
        pos, slot = pos + 1, slot + 1
        logits, route = decode(model, cache, mask, token[:, None], pos, slot)
        if route is not None:
            routes.append(route.clone())  # a CUDA graph's outputs are overwritten by its next replay
        finite = finite & (logits.isfinite().all(dim=-1) | done).all()  # rows past their eos do not count
        token = pick(logits)
        out.append(token)
        done = done | torch.isin(token, eos)
        if on_token or step % CHECK_EVERY == 0 or step == n - 1:
            check_finite(model, finite, step)
            if on_token:
                on_token(token.tolist())
            if done.all():
                break
    return out, routes


def decode_stats(model, tokens, routes, *, B, S, T, times):
    """Timings (times: start, prefill done, decoding done), tokens and the bytes a decode step read, with the
    distinct (layer, expert) pairs it hit on average."""
    t0, t1, t2 = times
    hit = 0
    if routes:
        chosen = F.one_hot(torch.stack(routes).flatten(2), model.config.num_experts)  # (steps, L, B*K, E)
        hit = chosen.amax(dim=2).sum().item() / len(routes)
    return dict(prefill_s=t1 - t0, prefill_tokens=B * T, decode_s=t2 - t1, decode_tokens=B * (len(tokens) - 1),
                step_bytes=bytes_per_decode_step(model, B, S, hit))


@torch.no_grad()
def generate(model, prompts, max_new_tokens, *, eos_ids=(), vocab_size=None, temperature=0.0, top_k=0, top_p=1.0,
             generator=None, compile=False, on_token=None, stats=None):
    """Continue each prompt (a list of token ids); return the new ids of each, up to and including its eos.
    Prompts of different lengths run as one left-padded batch; each row gives the tokens it would give alone.
    vocab_size: ids at or above it (the padded rows of the embedding) are never sampled. on_token(ids) is called
    after every step with the (B,) new ids. stats, a dict, receives timings and bytes read per decode step.
    compile: torch.compile the decode step (CUDA graphs on a GPU), once per model, batch size and cache bucket.
    Raises NonFiniteLogits if the logits overflow."""
    check_arguments(model.config, prompts, max_new_tokens, temperature, top_k, top_p)
    device = model.model.embed_tokens.weight.device
    B, T = len(prompts), max(map(len, prompts))
    S = cache_slots(T + max_new_tokens, model.config.max_position_embeddings) if compile else T + max_new_tokens
    cache, decode = compiled_decoding(model, B, S) if compile else (new_cache(model, B, S), decode_one_token)
    ids, mask, pos = left_padded(prompts, S, device)

    def pick(logits):  # the padded ids are the last rows of the vocabulary: cut them off
        return sample(logits[:, :vocab_size], temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)

    sync = measure.synchronizer(device)
    t0 = time.perf_counter()
    logits = prefill(model, ids, mask if any(len(p) < T for p in prompts) else None, pos, cache)
    check_finite(model, bool(logits.isfinite().all()), 0)
    token = pick(logits)  # (B,)
    sync()
    t1 = time.perf_counter()
    if on_token:
        on_token(token.tolist())
    eos = torch.tensor(list(eos_ids) or [-1], device=device)
    tokens, routes = decode_tokens(model, token, decode=decode, cache=cache, mask=mask, pos=pos[:, -1:],
                                   slot=torch.tensor([T - 1], device=device), n=max_new_tokens, pick=pick, eos=eos,
                                   on_token=on_token)
    sync()
    if stats is not None:
        stats.update(decode_stats(model, tokens, routes, B=B, S=S, T=T, times=(t0, t1, time.perf_counter())))
    rows = torch.stack(tokens, dim=1).tolist()  # (B, steps)
    return [row[: next((i + 1 for i, x in enumerate(row) if x in eos_ids), len(row))] for row in rows]


def render_chat(tokenizer_config, prompt):
    """The checkpoint's own chat template (Jinja, as transformers renders it) around one user message."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if not tokenizer_config.get("chat_template"):
        raise ValueError("--chat: this checkpoint's tokenizer_config.json has no chat_template")
    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        tokenizer_config["chat_template"])
    special = {k: v if isinstance(v, str) else (v or {}).get("content", "")
               for k, v in tokenizer_config.items() if k in ("bos_token", "eos_token")}
    return template.render(messages=[{"role": "user", "content": prompt}], add_generation_prompt=True, **special)


# --------------------------------------------------------------------------------------------------------------
# The command line: argparse -> load -> generate() -> print


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", action="append", required=True, help="text to continue; repeat for a batch")
    p.add_argument("--checkpoint", default="allenai/OLMoE-1B-7B-0924", help="local directory or Hub id")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 keeps all tokens")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the checkpoint's chat template")
    p.add_argument("--device", default=None, help="default: cuda, else mps, else cpu")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16; default: the checkpoint's own "
                   "(bfloat16 for the released ones), float16 where the device has no native bfloat16")
    p.add_argument("--quantize", choices=["int8", "int8-dynamic", "int4"], default=None,
                   help="weight-only int8 or int4; int8-dynamic: int8 activations too (x86 CPUs)")
    p.add_argument("--group-size", type=int, default=None, help="int4: inputs per scale (default: the largest of 128, "
                   "64 and 32 that divides every layer)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on GPU)")
    p.add_argument("--moe-dispatch", choices=["batched", "naive"], default="batched")
    p.add_argument("--reference", action="store_true", help="run olmoe.py's plain modules, without fast.py's "
                   "device-specific kernels (the same results, slower on most devices)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    args.echoed = False  # set once the prompt is printed: an error after it starts on a new line
    cli.run(run, args, errors=(ValueError, OSError, RuntimeError, FloatingPointError),
            before_error=lambda: args.echoed and print(flush=True))


def encode_prompts(args, tokenizer, tokenizer_config, config):
    """The prompts' token ids (in the chat template with --chat), checked against generate()'s limits."""
    texts = [render_chat(tokenizer_config, t) if args.chat else t for t in args.prompt]
    prompts = [tokenizer.encode(t, add_special_tokens=not args.chat).ids for t in texts]
    for i, ids in enumerate(prompts):
        if not ids:
            raise ValueError(f"prompt {i + 1} is empty: give some text to continue")
    check_arguments(config, prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    return prompts


def load(args, path, device, dtype):
    """The model as the flags ask: quantized or not, with fast.py's kernels unless --reference."""
    if args.group_size is not None and args.quantize != "int4":
        raise ValueError("--group-size is int4's: pass it with --quantize int4")
    try:
        if args.quantize:
            import quantize

            model = quantize.load_model(path, args.quantize, device=device, dtype=dtype, group_size=args.group_size,
                                        moe_dispatch=args.moe_dispatch)
        else:
            model = olmoe.load_model(path, device=device, dtype=dtype, moe_dispatch=args.moe_dispatch)
    except TypeError as e:  # MPS refuses a dtype it lacks (bfloat16 before macOS 14) with a TypeError
        if device.type != "mps":
            raise
        raise ValueError(f"{device}: {e} (try --dtype float16 or float32)") from None
    return model if args.reference else fast.apply(model)


def run(args):
    device = devices.pick_device(args.device)
    path = checkpoints.checkpoint_dir(args.checkpoint)
    config = olmoe.read_config(path)  # a bad checkpoint path or config fails here, before the tokenizer is read
    dtype = devices.pick_dtype(args.dtype, device, config)
    tokenizer, eos, tokenizer_config = checkpoints.load_tokenizer(path)
    prompts = encode_prompts(args, tokenizer, tokenizer_config, config)
    model = load(args, path, device, dtype)
    new_ids, printed = [], 0

    def stream(ids):  # one prompt: print the new text as it comes, holding back a half-decoded character
        nonlocal printed
        new_ids.extend(i for i in ids if i not in eos)
        text = tokenizer.decode(new_ids)
        if not text.endswith("\ufffd"):
            print(text[printed:], end="", flush=True)
            printed = len(text)

    single = len(prompts) == 1
    if single:
        print(args.prompt[0], end="", flush=True)
        args.echoed = True
    stats = {}
    generator = torch.Generator(device=device).manual_seed(args.seed)
    outputs = generate(model, prompts, args.max_new_tokens, eos_ids=eos, vocab_size=tokenizer.get_vocab_size(),
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator,
                       compile=args.compile, on_token=stream if single else None, stats=stats)
    for prompt, out in zip(args.prompt, outputs):
        text = tokenizer.decode([i for i in out if i not in eos])
        print(text[printed:] if single else prompt + text, end="\n" if single else "\n\n")
    print_stats(stats, device, len(prompts))


def print_stats(stats, device, B):
    """The statistics line, on stderr: prefill time, decode rate, the bandwidth it implies, peak memory, and on a
    CPU the class whose kernels it ran (fast.cpu_class)."""
    peak = measure.peak_memory(device)
    rate = stats["decode_tokens"] / stats["decode_s"] if stats["decode_tokens"] else 0.0
    cpu = f" | {fast.cpu_note(fast.device_facts(device)[1])}" if device.type == "cpu" else ""
    print(f"prefill {stats['prefill_tokens']} tokens in {stats['prefill_s'] * 1e3:.0f} ms | "
          f"decode {rate:.1f} tok/s | {stats['step_bytes'] * rate / B / 1e9:.1f} GB/s | "
          f"peak memory {peak / 1e9:.2f} GB ({'GPU' if device.type == 'cuda' else 'process RSS'}){cpu}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
