"""Progress on long work: a tqdm bar on a terminal, one plain line now and then anywhere else.

A bar redrawn into a log file (CI, ``nohup``, a pipe) is thousands of carriage-return frames; there the
progress is printed as whole lines, at most one every ``ICOT_PROGRESS_SECONDS`` seconds (default 60)
and once at the end. ``TQDM_DISABLE=1`` silences both.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

from tqdm.auto import tqdm

from icot.errors import ConfigError

DEFAULT_SECONDS = 60.0


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _interval() -> float:
    text = os.environ.get("ICOT_PROGRESS_SECONDS", "").strip()
    if not text:
        return DEFAULT_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise ConfigError(f"environment variable ICOT_PROGRESS_SECONDS is {text!r}: expected seconds >= 0")
    return seconds


class LineProgress:
    """The part of tqdm's interface the project uses, written as one line per interval."""

    def __init__(self, total: int, desc: str, initial: int = 0, file: TextIO | None = None,
                 seconds: float | None = None):
        self.total, self.desc, self.n = total, desc, initial
        self.file = file if file is not None else sys.stderr
        self.seconds = _interval() if seconds is None else seconds
        self.start = self.last = time.monotonic()
        self.start_n, self.postfix, self.closed = initial, "", False

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.seconds:
            self._write()

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._write()

    def _write(self) -> None:
        self.last = time.monotonic()
        elapsed = self.last - self.start
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        tail = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}/{self.total} ({rate:.2f}/s, {elapsed:.0f} s){tail}", file=self.file, flush=True)


def progress_bar(total: int, desc: str, initial: int = 0, enabled: bool = True, leave: bool = True
                 ) -> tqdm | LineProgress:
    """A progress display for ``total`` units: a bar on a terminal, :class:`LineProgress` elsewhere, a
    silent bar when ``enabled`` is false or ``TQDM_DISABLE`` is set."""
    if not enabled or _env_true("TQDM_DISABLE"):
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=leave)
    return LineProgress(total, desc, initial)
