"""Errors raised on bad user input: each names the file, the line and the problem."""

from __future__ import annotations

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
