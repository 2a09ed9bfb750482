"""Devices and processes: where a model decodes, and Accelerate's process-wide state.

Training gets its device from its ``Accelerator``; everything else (evaluation, the pipeline's
main-process checks, validation shards) asks here.
"""

from __future__ import annotations

import functools
import time

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


@functools.cache
def cpu_bf16_speedup(size: int = 512) -> float:
    """How many times faster a ``size x size`` bf16 matrix product runs than an fp32 one on this CPU.

    Above 1 where the CPU multiplies bf16 natively (AVX512_BF16, AMX: 4x at 1024 on the Zen 4 of
    results/speed/); far below 1 where torch emulates it (an AVX2-only EPYC: 60-250x slower), which makes bf16
    autocast a slowdown there instead of a lever. Measured once per process (about a second at worst), at the
    current thread count, the best of two products each after a warm-up.
    """
    def seconds(dtype: torch.dtype) -> float:
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        a @ b
        best = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        return best

    return seconds(torch.float32) / seconds(torch.bfloat16)


def resolve_mixed_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """The mixed precision a stage trains with on ``device``, and a note for the log ("" if nothing to say).

    ``auto`` is bf16 where the device runs it natively (a CUDA GPU that supports it, a CPU whose bf16 matrix
    products beat fp32, :func:`cpu_bf16_speedup`) and ``no`` elsewhere; it never picks fp16, which needs loss
    scaling (ask for it by name). An explicit ``bf16`` on a CPU that emulates it is kept, with a warning.
    """
    if requested not in ("auto", "bf16"):
        return requested, ""
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
        why = "this GPU supports bf16" if native else "this GPU has no bf16"
    elif device.type == "cpu":
        speedup = cpu_bf16_speedup()
        native = speedup > 1.0
        why = (f"bf16 matrix products run {speedup:.1f}x as fast as fp32 on this CPU" if native else
               f"bf16 matrix products run {1 / speedup:.0f}x slower than fp32 on this CPU (no native bf16)")
    else:
        native, why = False, f"bf16 autocast is not used on {device.type}"
    if requested == "bf16":
        return "bf16", ("" if native or device.type != "cpu" else
                        f"warning: mixed_precision bf16 kept although {why}; 'auto' or 'no' trains faster here")
    return ("bf16" if native else "no"), f"mixed_precision auto -> {'bf16' if native else 'no'}: {why}"
