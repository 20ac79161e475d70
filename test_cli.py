"""Tests of cli.py: what a user sees when something they gave is wrong, and the phases a run announces."""

import pytest

import cli
import olmoe


def exits(capsys, work, **kw):
    with pytest.raises(SystemExit) as e:
        cli.run(work, None, **kw)
    return e.value.code, capsys.readouterr().err


def test_a_users_mistake_is_one_error_line_and_exit_status_1(capsys):
    def bad(_):
        raise ValueError("--steps 0: expected at least 1\n(a second line nobody needs)")

    assert exits(capsys, bad) == (1, "error: --steps 0: expected at least 1\n")
    assert cli.run(lambda args: args + 1, 1) == 2  # no error: the work's result


def test_a_checkpoint_error_is_said_whole_since_it_lists_commands(capsys):
    def offline(_):
        raise olmoe.CheckpointError("x/y: not downloadable. Use a model made here:\npython train.py ...")

    assert exits(capsys, offline) == (1, "error: x/y: not downloadable. Use a model made here:\npython train.py ...\n")


def test_only_the_first_process_says_the_error_and_ctrl_c_exits_130(capsys, monkeypatch):
    def bad(_):
        raise OSError("disk full")

    monkeypatch.setenv("RANK", "1")
    assert exits(capsys, bad) == (1, "")
    monkeypatch.setenv("RANK", "0")
    said = []
    assert exits(capsys, bad, before_error=lambda: said.append(True)) == (1, "error: disk full\n") and said

    def interrupted(_):
        raise KeyboardInterrupt

    assert exits(capsys, interrupted)[0] == 130


def test_an_error_not_listed_is_not_swallowed(capsys):
    def bug(_):
        raise RuntimeError("a bug: show its traceback")

    with pytest.raises(RuntimeError):
        cli.run(bug, None, errors=(ValueError,))


def test_saying_announces_a_phase_then_what_it_found_on_the_same_line(capsys):
    with cli.saying(True, "tokenizing") as said:
        said.append("1,000 tokens")
    err = capsys.readouterr().err
    assert err.startswith("tokenizing ... 1,000 tokens, ") and err.endswith(" s\n")
    with pytest.raises(ValueError), cli.saying(True, "reading"):
        raise ValueError("bad")
    assert capsys.readouterr().err == "reading ... \n"  # the error's line starts on a line of its own
    with cli.saying(False, "quiet"):
        pass
    assert capsys.readouterr().err == ""
