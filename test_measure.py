"""Tests of measure.py: the clock that waits for the device, and the parameters a token multiplies."""

import torch

import measure


def test_synchronizer_waits_on_the_devices_own_queue():
    """CUDA and MPS queue work asynchronously, so a timing waits on that device's synchronize; a CPU has nothing
    queued, and its synchronizer does nothing."""
    assert measure.synchronizer(torch.device("cuda")) is torch.cuda.synchronize
    assert measure.synchronizer(torch.device("mps")) is torch.mps.synchronize
    cpu = measure.synchronizer(torch.device("cpu"))
    assert cpu not in (torch.cuda.synchronize, torch.mps.synchronize) and cpu() is None


def test_active_params_count_k_of_e_experts_and_lm_head_when_asked():
    import olmoe

    config = olmoe.OlmoeConfig(vocab_size=100, hidden_size=16, intermediate_size=8, num_hidden_layers=2,
                               num_attention_heads=2, num_experts=8, num_experts_per_tok=2)
    D, I, E, K, V, L = 16, 8, 8, 2, 100, 2
    attention = 4 * D * D + 2 * D  # q, k, v, o (no grouping) and the QK norms (OLMoE normalises all of q and k)
    per_layer = attention + 2 * D + D * E + K * 3 * D * I  # two norms, the router, K experts of gate, up and down
    assert measure.active_params(config, lm_head=False) == L * per_layer
    assert measure.active_params(config) == L * per_layer + V * D
    dense = olmoe.Olmo2Config(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2)
    assert measure.active_params(dense, lm_head=False) == sum(
        p.numel() for n, p in olmoe.Transformer(dense).named_parameters() if n.startswith("model.layers"))


def test_matmul_rate_is_a_products_flops_over_its_median_time(monkeypatch):
    timed = []
    monkeypatch.setattr(measure, "timed", lambda fn, sync, repeat: timed.append(repeat) or 0.5)
    assert measure.matmul_rate(torch.device("cpu"), torch.float32) == 2 * 1024**3 / 0.5  # a 1024 x 1024 product
    assert timed == [5]
