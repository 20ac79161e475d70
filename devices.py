"""Which device a command runs on, and in which dtype: the rules every command line here shares (generate.py,
train.py, evaluate.py, routing.py, benchmark.py), written once.

    device = devices.pick_device(args.device)                  # cuda, else mps, else cpu
    dtype = devices.pick_dtype(args.dtype, device, config)     # the checkpoint's own, unless the device emulates it
"""

import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name):
    """The device named, or by default cuda, else mps, else cpu."""
    mps = getattr(torch.backends, "mps", None)
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else
                                   "mps" if mps and mps.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available")
    return device


def bf16_emulated(device):
    """Why this device only emulates bfloat16 (a sentence), or None where it computes it natively."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        # Before Ampere (T4, V100) bf16 is emulated: slow, and SDPA's memory-efficient kernel and inductor skip it.
        return f"{torch.cuda.get_device_name(device)} has no native bfloat16"
    mps = getattr(torch.backends, "mps", None)
    if device.type == "mps" and not mps.is_macos_or_newer(14, 0):  # MPS has bf16 from macOS 14 on
        return "bfloat16 needs macOS 14 on MPS"
    return None


def native_dtype(device, dtype):
    """dtype, unless this device only emulates it; then the dtype it runs natively, and a note saying so."""
    why = bf16_emulated(device) if dtype == torch.bfloat16 else None
    if why is None:
        return dtype, None
    return torch.float16, f"note: {why}; running in float16 (--dtype float32 if it overflows)"


def pick_dtype(name, device, config):
    """The dtype named, or by default the checkpoint's own, unless the device only emulates it (then one note)."""
    if name is not None:
        if name not in DTYPES:
            raise ValueError(f"--dtype {name!r}: expected one of {', '.join(DTYPES)}")
        return DTYPES[name]
    dtype, note = native_dtype(device, getattr(torch, config.dtype))
    if note:
        print(note, file=sys.stderr)
    return dtype


def training_dtype(name, device):
    """The dtype training computes in (autocast; weights and optimizer state stay float32): the one named, else
    bfloat16 on a GPU that computes it natively (CUDA from Ampere on), else float32."""
    if name is not None:
        return DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" and bf16_emulated(device) is None else torch.float32


def device_name(device):
    """The device in words, for the first line of a measurement: the GPU's name and capability, or the CPU's
    threads."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (sm{''.join(map(str, torch.cuda.get_device_capability(device)))})"
    return f"CPU ({torch.get_num_threads()} threads)" if device.type == "cpu" else device.type.upper()
