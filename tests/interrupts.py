"""A signal sent from inside a training stage, for the tests that interrupt and resume one."""

from __future__ import annotations

import os
import signal


def signal_at_call(stage, call: int, signum: int = signal.SIGINT) -> None:
    """Make the stage's ``loss`` send ``signum`` to this process at its ``call``-th call."""
    loss, calls = stage.loss, [0]

    def signalling(module, batch):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signum)
        return loss(module, batch)

    stage.loss = signalling
