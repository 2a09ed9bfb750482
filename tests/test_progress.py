"""Progress display: a bar on a terminal, whole lines in a log, nothing under TQDM_DISABLE."""

from __future__ import annotations

import io
import sys

import pytest

from icot import progress
from icot.errors import ConfigError
from icot.progress import LineProgress, progress_bar


def test_line_progress_writes_whole_lines_at_most_once_per_interval():
    out = io.StringIO()
    bar = LineProgress(total=1000, desc="teacher", file=out, seconds=3600)
    for _ in range(1000):
        bar.update(1)
    bar.set_postfix(acc="0.500")
    bar.close()
    bar.close()  # closing twice writes once
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "\r" not in out.getvalue()
    assert lines[0].startswith("teacher: 1000/1000 (") and lines[0].endswith("acc=0.500")


def test_line_progress_every_update_at_interval_zero():
    out = io.StringIO()
    bar = LineProgress(total=3, desc="eval", initial=1, file=out, seconds=0)
    bar.update(1)
    bar.update(1)
    assert [line.split(" (")[0] for line in out.getvalue().splitlines()] == ["eval: 2/3", "eval: 3/3"]


def test_progress_bar_kind_follows_the_terminal_and_tqdm_disable(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    assert isinstance(progress_bar(10, "x"), LineProgress)
    assert progress_bar(10, "x", enabled=False).disable
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert progress_bar(10, "x").disable

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("TQDM_DISABLE")
    monkeypatch.setattr(sys, "stderr", Terminal())
    bar = progress_bar(10, "x")
    assert not isinstance(bar, LineProgress) and not bar.disable
    bar.close()


def test_progress_interval_from_the_environment(monkeypatch):
    monkeypatch.setenv("ICOT_PROGRESS_SECONDS", "5")
    assert progress._interval() == 5.0
    monkeypatch.delenv("ICOT_PROGRESS_SECONDS")
    assert progress._interval() == progress.DEFAULT_SECONDS
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("ICOT_PROGRESS_SECONDS", bad)
        with pytest.raises(ConfigError, match="ICOT_PROGRESS_SECONDS"):
            progress._interval()
