"""Devices and processes: where a model decodes, and Accelerate's process-wide state.

Training gets its device from its ``Accelerator``; everything else (evaluation, the pipeline's
main-process checks, validation shards) asks here.
"""

from __future__ import annotations

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from icot.errors import ConfigError


def process_state() -> PartialState:
    """Accelerate's process-wide state, set up the way an ``Accelerator`` would set it up.

    ``PartialState()`` alone ignores ``ACCELERATE_USE_CPU``: created first in CPU processes started by
    ``accelerate launch``, it would make each of them a lone main process.
    """
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def decode_device(name: str = "auto") -> torch.device:
    """The device that ``eval.device`` names; ``auto`` is Accelerate's (a GPU when the process has one).

    Raises:
        ConfigError: for a name torch does not know or a device this machine lacks.
    """
    if name == "auto":
        return process_state().device
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"field 'eval.device' is '{name}', which is not a torch device (auto, cpu, cuda, cuda:1, "
                          "mps, ...)") from None
    if device.type == "meta":
        raise ConfigError(f"field 'eval.device' is '{name}': a meta tensor holds no values to decode with")
    try:  # a CUDA build without a GPU, a GPU index past the last, a backend torch was built without
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        reason = str(e).strip().split(". ")[0] or type(e).__name__
        raise ConfigError(f"field 'eval.device' is '{name}', which torch cannot use here: {reason}") from None
    return device
