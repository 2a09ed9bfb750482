"""SIGINT / SIGTERM during training: finish the optimizer step, write a checkpoint, exit cleanly.

A signal only sets a flag; the training loop looks at it at each optimizer-step boundary, where the
model, optimizer and data position form a consistent state to save. The same signal a second time
aborts at once (the last complete checkpoint stays intact, checkpoints being replaced atomically).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

HANDLED = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Context manager that turns SIGINT/SIGTERM into a stop request, restoring the previous handlers on exit.

    Attributes:
        signum: the first signal received, or None.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        # Python only lets the main thread install handlers; elsewhere (a notebook worker thread)
        # signals keep their default behaviour.
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum == signum:
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} twice: stopped without saving")
        if self.signum is None:
            self.signum = signum
