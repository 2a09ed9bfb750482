"""Errors raised on bad user input (each names the file, the line and the problem), and the clean stop of
an interrupted training run."""

from __future__ import annotations

import signal
from pathlib import Path


class IcotInputError(ValueError):
    """Bad input from the user (data file, config, checkpoint).

    The message reads ``FILE:LINE: problem`` (or ``FILE: problem`` without a line) so that it can be
    printed as one line by the CLI and jumped to by an editor.
    """

    def __init__(self, problem: str, path: str | Path | None = None, line: int | None = None):
        self.problem = problem
        self.path = None if path is None else str(path)
        self.line = line
        where = self.path if self.path is not None else "<input>"
        if line is not None:
            where = f"{where}:{line}"
        super().__init__(f"{where}: {problem}")


class DataFormatError(IcotInputError):
    """A data line that is not ``INPUT||COT #### ANSWER`` (or not valid for its task)."""


class ConfigError(IcotInputError):
    """A config field that is unknown, of the wrong type or out of range."""


class CheckpointError(IcotInputError):
    """A model directory that is missing files or does not fit what loads it."""


class TrainingInterrupted(Exception):
    """Training stopped cleanly on SIGINT or SIGTERM after writing a checkpoint, or, for a signal that came
    during a stage's last step or final validation, after writing the finished stage.

    Attributes:
        signum: the signal that asked for the stop.
        step: the optimizer step the checkpoint (or the finished stage) holds.
        checkpoint: the checkpoint directory (``--resume`` continues from it), or the finished stage's.
        exit_code: ``128 + signum``, the shell's convention (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signum: int, step: int, checkpoint: str | Path, finished: bool = False):
        self.signum, self.step, self.checkpoint = signum, step, str(checkpoint)
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        if finished:  # the signal came as the stage ended: its output is complete, no checkpoint is needed
            super().__init__(f"interrupted by {name} as the stage finished at step {step}; the stage is complete "
                             f"in {checkpoint}; run the same 'icot pipeline' again to go on from the next stage")
        else:
            super().__init__(f"interrupted by {name} at step {step}; checkpoint saved in {checkpoint}; continue "
                             "with 'icot train ... --resume' (or run the same 'icot pipeline' again)")
