"""Devices and processes: where a model decodes, and Accelerate's process-wide state.

Training gets its device from its ``Accelerator``; everything else (evaluation, the pipeline's
main-process checks, validation shards) asks here.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

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


# CPU flags of native bf16 arithmetic as Linux lists them: x86's AVX512_BF16 and AMX, Arm's BF16 (ARMv8.6).
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """Whether the CPU lists a native bf16 instruction set (:data:`BF16_FLAGS`) among its ``flags`` (x86) or
    ``Features`` (Arm) in ``cpuinfo``; None where that file is missing or lists neither (not Linux)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & set(BF16_FLAGS)) if flags else None


def cpu_bf16_speedup(size: int = 512) -> float:
    """How many times faster a ``size x size`` bf16 matrix product runs than an fp32 one on this CPU.

    Above 1 where the CPU multiplies bf16 natively (4x at 1024 on the Zen 4 of results/speed/); far below 1 where
    torch emulates it (an AVX2-only EPYC: 60-250x slower at 512-2048, a few seconds for this measurement on one
    thread). The best of two products each after a warm-up, at the current thread count, on inputs drawn from
    a generator of its own (the global seed is left alone).
    """
    generator = torch.Generator().manual_seed(0)

    def seconds(dtype: torch.dtype) -> float:
        a, b = (torch.randn(size, size, generator=generator).to(dtype) for _ in range(2))
        a @ b
        best = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        return best

    return seconds(torch.float32) / seconds(torch.bfloat16)


@functools.cache
def cpu_runs_bf16_natively() -> tuple[bool, str]:
    """``(native, why)`` for this CPU, decided once per process.

    From the CPU's flags where Linux lists them, so that every process of a multi-process run decides alike;
    elsewhere from :func:`cpu_bf16_speedup` with a margin (1.5x), since autocast adds casts to the products.
    """
    flags = cpu_bf16_flags()
    if flags is not None:
        if flags:
            return True, "this CPU has native bf16 instructions (avx512_bf16, amx_bf16 or Arm bf16)"
        return False, ("this CPU has no native bf16 instructions (avx512_bf16, amx_bf16, Arm bf16): torch emulates "
                       "bf16 there, 60-250x slower than fp32 on an AVX2-only EPYC")
    speedup = cpu_bf16_speedup()
    return speedup > 1.5, f"a bf16 matrix product ran {speedup:.2f}x as fast as an fp32 one on this CPU"


def resolve_mixed_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """The mixed precision a stage trains with on ``device``, and a note for the log ("" if nothing to say).

    ``auto`` is bf16 where the device runs it natively (a CUDA GPU with bf16 arithmetic, compute capability 8 or
    more; a CPU, :func:`cpu_runs_bf16_natively`) and ``no`` elsewhere (other accelerators included); it never
    picks fp16, which needs loss scaling (ask for it by name). An explicit ``bf16`` on a CPU that emulates it is
    kept, with a warning.
    """
    if requested not in ("auto", "bf16"):
        return requested, ""
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        why = "this GPU has bf16 arithmetic" if native else "this GPU only emulates bf16"
    elif device.type == "cpu":
        native, why = cpu_runs_bf16_natively()
    else:
        native, why = False, f"auto uses no bf16 autocast on {device.type}"
    if requested == "bf16":
        warn = not native and device.type in ("cpu", "cuda")
        return "bf16", (f"warning: mixed_precision bf16 kept although {why}; 'auto' or 'no' trains faster here"
                        if warn else "")
    return ("bf16" if native else "no"), f"mixed_precision auto -> {'bf16' if native else 'no'}: {why}"
