"""Console output: bars only on a terminal, plain periodic lines otherwise, verbosity levels."""

import logging

import pytest

from mimo_jax.core import logs


@pytest.fixture(autouse=True)
def normal_verbosity():
    logs.set_verbosity("normal")
    yield
    logs.set_verbosity("normal")


def test_plain_lines_when_stderr_is_not_a_terminal(capsys):
    assert not logs.bars_fit()  # pytest captures stderr: not a TTY
    with logs.Progress(4 << 20, desc="copy", unit="B", unit_scale=True, every_s=0.0) as p:
        assert not p.live
        p.update(1 << 20)
        p.set(3 << 20, postfix="file=a")
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert [line.split(" [")[0] for line in lines] == [
        "copy:  25% 1.00M/4.00M", "copy:  75% 3.00M/4.00M", "copy:  75% 3.00M/4.00M"]
    assert lines[1].endswith("file=a]")


def test_plain_lines_at_most_every_n_seconds(capsys):
    with logs.Progress(100, desc="x", every_s=3600) as p:
        for _ in range(100):
            p.update()
    assert capsys.readouterr().err == ""  # a short task prints nothing, not even at close
    with logs.Progress(100, desc="x", every_s=0.0, plain=False) as p:
        p.update(5)
    assert capsys.readouterr().err == ""  # the caller prints its own summaries


def test_bar_on_a_terminal_with_messages_above_it(monkeypatch, capsys):
    monkeypatch.setattr(logs, "bars_fit", lambda: True)
    with logs.Progress(10, desc="steps", unit="step") as p:
        assert p.live
        p.set(4, postfix="loss=1.5")
        logs.info("a message")
    err = capsys.readouterr().err
    assert "\r" in err and "steps:" in err and "a message\n" in err
    assert "10/10" not in err and "4/10" in err


def test_disabled_progress_prints_nothing(monkeypatch, capsys):
    monkeypatch.setattr(logs, "bars_fit", lambda: True)
    with logs.Progress(10, desc="x", enabled=False, every_s=0.0) as p:
        p.update(3)
        assert not p.live
    assert capsys.readouterr().err == ""


def test_verbosity_levels(monkeypatch, capsys):
    monkeypatch.setattr(logs, "bars_fit", lambda: True)
    logs.set_verbosity("quiet")
    logs.info("hidden")
    logs.get_logger().warning("shown")
    with logs.Progress(10, desc="x", every_s=0.0) as p:
        assert not p.live
        p.update(3)
    assert capsys.readouterr().err == "shown\n"
    assert logging.getLogger("absl").level == logging.ERROR
    assert logging.getLogger("jax").level == logging.ERROR
    logs.set_verbosity("verbose")
    assert logging.getLogger("absl").level == logging.INFO
    assert logging.getLogger().handlers  # library INFO records have somewhere to go
    logs.set_verbosity("normal")
    assert logging.getLogger("absl").level == logging.WARNING
    logs.info("back")
    assert capsys.readouterr().err == "back\n"
    with pytest.raises(ValueError, match="quiet, normal, verbose"):
        logs.set_verbosity("loud")
