"""Tests of checkpoints.py: finding a checkpoint (a Hub id, a local directory, a train.py run) and what --resume
checks. Writing and resuming whole runs is tested through train.py, in test_train.py."""

import checkpoints
import olmoe
from conftest import TRAIN_MOE


def test_a_train_run_directory_stands_for_its_latest_checkpoint(tmp_path, capsys):
    """checkpoint_dir(run) is the run's latest step-NNNNNN with a config.json, said in one line; a checkpoint
    directory is itself, silently."""
    for step in ("step-000000", "step-000100", "step-000050", "step-000150"):
        (tmp_path / step).mkdir()
        if step != "step-000150":  # a step being written: no config.json yet
            (tmp_path / step / "config.json").write_text("{}")
    assert checkpoints.checkpoint_dir(str(tmp_path)) == tmp_path / "step-000100"
    assert capsys.readouterr().err == f"{tmp_path}: a train.py run; its latest checkpoint is step-000100\n"
    assert checkpoints.checkpoint_dir(str(tmp_path / "step-000050")) == tmp_path / "step-000050"
    assert capsys.readouterr().err == ""


def test_checkpoint_dir_takes_local_paths_as_they_are_and_fetches_hub_ids(tmp_path, monkeypatch):
    import huggingface_hub

    fetched = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda name, **kw: fetched.append((name, kw)) or str(tmp_path / "snapshot"))
    local = tmp_path / "owner" / "name"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert checkpoints.checkpoint_dir("owner/name") == local.relative_to(tmp_path)  # an existing directory wins
    for name, path in [("./a/b", tmp_path / "a" / "b"), ("~/a", tmp_path / "a"), ("a/b/c", tmp_path / "a/b/c"),
                       ("x", tmp_path / "x"), (str(tmp_path / "y"), tmp_path / "y")]:
        assert checkpoints.checkpoint_dir(name).absolute() == path, name
    assert not fetched
    assert checkpoints.checkpoint_dir("allenai/OLMoE-1B-7B-0924") == tmp_path / "snapshot"
    assert fetched == [("allenai/OLMoE-1B-7B-0924", dict(allow_patterns=["*.json", "*.safetensors"]))]


def test_config_difference_ignores_the_router_coefficients_and_dtype_but_not_the_shape():
    """The router coefficients record the run's --lb-coef and --z-coef, and dtype how weights are stored: none of
    them makes another model, so a run may resume with other values; any other field does."""
    here = olmoe.config_from_dict({**TRAIN_MOE, "vocab_size": 64})
    ckpt = olmoe.config_from_dict({**TRAIN_MOE, "vocab_size": 64, "router_aux_loss_coef": 0.5,
                                   "router_z_loss_coef": 0.25, "dtype": "bfloat16"})
    assert (ckpt.router_aux_loss_coef, ckpt.router_z_loss_coef, ckpt.dtype) != \
           (here.router_aux_loss_coef, here.router_z_loss_coef, here.dtype)
    assert checkpoints.config_difference(here, ckpt) is None
    other = olmoe.config_from_dict({**TRAIN_MOE, "vocab_size": 64, "num_experts": 4})
    assert checkpoints.config_difference(here, other) == "num_experts 8 here, 4 in the checkpoint"
