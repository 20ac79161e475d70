"""Tests of parallel.py on one process: what torchrun's variables say, and the whole state round trip that lets any
run resume any other. The processes themselves (DDP, FSDP2 on gloo) are tested through train.py, in test_train.py."""

import torch

import parallel


def test_torchrun_variables_say_whether_there_are_peers(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not parallel.started_by_torchrun() and parallel.world_size() == 1 and parallel.is_main_process()
    assert parallel.start_processes("cpu") == (0, 1, torch.device("cpu"))
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert parallel.started_by_torchrun() and parallel.world_size() == 4 and not parallel.is_main_process()


def test_full_state_names_the_optimizer_state_by_parameter_and_loads_back():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    weights, state = parallel.full_state(model, optimizer, fsdp=False)
    assert state is None and weights.keys() == model.state_dict().keys()  # no step yet: no optimizer state
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    weights, state = parallel.full_state(model, optimizer, fsdp=False)
    assert set(state["state"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert state["param_groups"][0]["params"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    other = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    other.load_state_dict(weights)
    other_optimizer = torch.optim.AdamW(other.parameters(), lr=0.1)
    parallel.load_optimizer_state(other, other_optimizer, state, fsdp=False)
    for p, q in zip(model.parameters(), other.parameters()):
        a, b = optimizer.state[p], other_optimizer.state[q]
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_gradient_sync_is_a_no_op_on_one_process():
    model = torch.nn.Linear(2, 2)
    parallel.sync_gradients(model, fsdp=False, on=False)
    assert parallel.unwrap(model) is model and not parallel.is_wrapped(model, fsdp=False)
