"""What every speed and memory figure here is computed from, written once: a clock that waits for the device, the
device's measured matmul rate, the process's peak memory, and the parameters a token multiplies (train.py's MFU,
generate.py's statistics line, benchmark.py's bounds)."""

import sys
import time
from pathlib import Path

import torch

import olmoe


def synchronizer(device):
    """A function that waits for the device's queued work: timings need it on CUDA and MPS."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


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


def matmul_rate(device, dtype, repeat=5):
    """The device's measured matmul rate in dtype (FLOP/s): the denominator of MFU."""
    n = 1024 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, synchronizer(device), repeat)


def peak_memory(device):
    """Peak bytes so far: allocated GPU memory on CUDA, else this process's peak resident memory. On Linux that is
    VmHWM of /proc/self/status, which starts anew in every exec'd process; ru_maxrss would also count the
    high-water mark of the process that started this one (the kernel keeps it across exec)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    status = Path("/proc/self/status")
    hwm = next((line for line in status.read_text().splitlines() if line.startswith("VmHWM:")), None) \
        if status.is_file() else None
    if hwm:
        return int(hwm.split()[1]) * 1024  # "VmHWM:   123456 kB"
    import resource  # macOS (not on Windows)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def active_params(config, lm_head=True):
    """Parameters each token multiplies: every block's, with K of the E experts, and lm_head's unless lm_head is
    False (a prefill's last position alone reaches it); the embedding is a lookup. Training does about 6 FLOPs
    per active parameter per token (forward 2, backward 4)."""
    with torch.device("meta"):
        model = olmoe.Transformer(config)
    K, E = getattr(config, "num_experts_per_tok", 1), getattr(config, "num_experts", 1)
    n = 0
    for name, p in model.named_parameters():
        if name.startswith("model.layers") or lm_head and name.startswith("lm_head"):
            n += p.numel() * (K / E if "experts" in name else 1)
    return n
