"""Tests of devices.py: the device and dtype each command picks, every GPU class simulated on the CPU."""

import pytest
import torch

import devices


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
    dtype, note = devices.native_dtype(torch.device(device), torch.bfloat16)
    assert dtype == expected
    assert (note is None) == (expected == torch.bfloat16)
    assert devices.native_dtype(torch.device(device), torch.float32) == (torch.float32, None)


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_pick_device_defaults_to_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert devices.pick_device(None) == torch.device(expected)
    assert devices.pick_device("cpu") == torch.device("cpu")


def test_pick_dtype_is_the_named_one_else_the_checkpoints_native_one(monkeypatch, capsys):
    from types import SimpleNamespace

    for name, dtype in devices.DTYPES.items():
        assert devices.pick_dtype(name, torch.device("cpu"), SimpleNamespace(dtype="bfloat16")) == dtype
    assert devices.pick_dtype(None, torch.device("cpu"), SimpleNamespace(dtype="float32")) == torch.float32
    assert devices.pick_dtype(None, torch.device("cpu"), SimpleNamespace(dtype="bfloat16")) == torch.bfloat16
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Simulated T4")
    assert devices.pick_dtype(None, torch.device("cuda"), SimpleNamespace(dtype="bfloat16")) == torch.float16
    assert "Simulated T4 has no native bfloat16" in capsys.readouterr().err


@pytest.mark.parametrize("device, capability, name, expected", [
    ("cuda", (9, 0), None, torch.bfloat16),  # H100: autocast in bf16
    ("cuda", (8, 0), None, torch.bfloat16),  # A100
    ("cuda", (7, 5), None, torch.float32),  # T4: bf16 only emulated, and fp16 training would need a loss scaler
    ("cpu", None, None, torch.float32),
    ("mps", None, None, torch.float32),
    ("cpu", None, "bfloat16", torch.bfloat16),  # named: taken as it is
    ("cuda", (9, 0), "float32", torch.float32),
])
def test_training_computes_in_bf16_only_where_a_gpu_has_it_natively(monkeypatch, device, capability, name, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Simulated GPU")
    assert devices.training_dtype(name, torch.device(device)) == expected
