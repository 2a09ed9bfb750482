"""The stage registry: every training stage by name, with what the CLI and the pipeline derive from it.

Each entry says how to build the stage, its directory under a pipeline's ``RUN_DIR``, the config
sections its output depends on (a change in any of them makes a finished stage stale and is refused on
resume, budget fields aside) and the stage directories it reads (``--teacher``, ``--student``,
``--emulator``). ``ORDER`` is the training order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed

from icot.config import IcotConfig
from icot.errors import ConfigError
from icot.training import couple, emulator, nocot, stepwise, student, teacher
from icot.training.loop import Stage, run_settings, train_stage


@dataclass(frozen=True)
class StageSpec:
    """One stage: ``build(config, *dirs of needs)`` makes it; ``directory`` is its place under RUN_DIR."""

    name: str
    build: Callable[..., Stage]
    directory: str
    depends: tuple[str, ...]
    needs: tuple[str, ...] = ()


REGISTRY: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("teacher", teacher.build, "teacher", ("data", "model", "teacher")),
    StageSpec("nocot", nocot.build, "nocot", ("data", "model", "nocot")),
    StageSpec("student", student.build, "student", ("data", "model", "teacher", "kd", "student"), ("teacher",)),
    StageSpec("emulator", emulator.build, "emulator", ("data", "model", "teacher", "kd", "emulator"), ("teacher",)),
    StageSpec("couple", couple.build, "implicit",
              ("data", "model", "teacher", "kd", "student", "emulator", "couple"), ("student", "emulator")),
    StageSpec("stepwise", stepwise.build, "stepwise", ("data", "model", "teacher", "si", "stepwise"), ("teacher",)),
)}
ORDER = tuple(REGISTRY)


def spec(name: str) -> StageSpec:
    """The registry entry of stage ``name``."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown stage '{name}' (known: {', '.join(ORDER)})")
    return REGISTRY[name]


def needs(name: str, config: IcotConfig) -> tuple[str, ...]:
    """The stages whose directories stage ``name`` reads under ``config``: a stepwise stage trained from
    scratch (``si.from_teacher: false``) reads no teacher."""
    if name == "stepwise" and not config.si.from_teacher:
        return ()
    return spec(name).needs


def depends(name: str, config: IcotConfig) -> tuple[str, ...]:
    """The config sections stage ``name``'s output depends on under ``config`` (no teacher section for a
    stepwise stage trained from scratch)."""
    if name == "stepwise" and not config.si.from_teacher:
        return tuple(d for d in spec(name).depends if d != "teacher")
    return spec(name).depends


def build(name: str, config: IcotConfig, **dirs: str) -> Stage:
    """The stage called ``name``, wired to the stage directories it reads (``teacher=DIR`` and so on).

    The stage's seed is set first, so from-scratch weights and new modules depend on it alone.
    """
    entry = spec(name)
    wanted = needs(name, config)
    if name == "stepwise" and wanted and not (dirs.get("teacher") or config.stepwise.init_from):
        raise ConfigError("stage 'stepwise' needs --teacher DIR (or si.from_teacher: false to train from "
                          "scratch with the schedule running from step 0)")
    missing = [n for n in wanted if not dirs.get(n) and name != "stepwise"]
    if missing:
        raise ConfigError(f"stage '{name}' needs --{missing[0]} DIR")
    set_seed(getattr(config, name).seed)
    return entry.build(config, *[dirs.get(n, "") for n in wanted])


def reads(name: str, config: IcotConfig, **dirs: str) -> dict[str, str]:
    """The stage directories stage ``name`` reads, of ``dirs`` (``teacher=DIR``, ...)."""
    return {n: dirs[n] for n in needs(name, config) if dirs.get(n)}


def settings(name: str, config: IcotConfig, **dirs: str) -> dict[str, Any]:
    """What makes a checkpoint of stage ``name`` this run's (:func:`icot.training.loop.run_settings`)."""
    return run_settings(config, depends(name, config), reads(name, config, **dirs))


def run(name: str, config: IcotConfig, out_dir: str | Path, progress: bool = True, resume: bool = False,
        **dirs: str) -> dict[str, Any]:
    """Build and train stage ``name``; its output goes to ``out_dir`` (``resume``: from its checkpoint)."""
    stage = build(name, config, **dirs)
    return train_stage(stage, getattr(config, name), out_dir, config, progress=progress, resume=resume,
                       depends=depends(name, config), reads=reads(name, config, **dirs))
