"""Tests for benchmark.py: the self-check a user runs on their GPU, here on the CPU."""

import torch

import benchmark
import olmoe


def test_self_check_passes_on_this_device():
    results = benchmark.check_paths(torch.device("cpu"), models=("OLMoE",), batches=(8,))
    assert len(results) == 3 + 3 * len(olmoe.MOE_PATHS)
    assert [what for what, ok, _ in results if not ok] == []
