"""Stage registry: build a stage by name and run it on the shared loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelerate.utils import set_seed

from icot.config import IcotConfig
from icot.errors import ConfigError
from icot.training.loop import Stage, train_stage


def _need(value: str, flag: str, stage: str) -> str:
    if not value:
        raise ConfigError(f"stage '{stage}' needs --{flag} DIR")
    return value


def build(name: str, config: IcotConfig, teacher: str = "", student: str = "", emulator: str = "") -> Stage:
    """The stage called ``name``, wired to the stage directories it depends on.

    The stage's seed is set first, so from-scratch weights and new modules depend on it alone.
    """
    set_seed(getattr(config, name).seed)
    if name == "teacher":
        from icot.training import teacher as mod

        return mod.build(config)
    if name == "nocot":
        from icot.training import nocot as mod

        return mod.build(config)
    if name == "student":
        from icot.training import student as mod

        return mod.build(config, _need(teacher, "teacher", name))
    if name == "emulator":
        from icot.training import emulator as mod

        return mod.build(config, _need(teacher, "teacher", name))
    if name == "stepwise":
        from icot.training import stepwise as mod

        if config.si.from_teacher and not (teacher or config.stepwise.init_from):
            raise ConfigError("stage 'stepwise' needs --teacher DIR (or si.from_teacher: false to train from "
                              "scratch with the schedule running from step 0)")
        return mod.build(config, teacher)
    if name == "couple":
        from icot.training import couple as mod

        return mod.build(config, _need(student, "student", name), _need(emulator, "emulator", name))
    raise ConfigError(f"unknown stage '{name}'")


def run(name: str, config: IcotConfig, out_dir: str | Path, progress: bool = True, resume: bool = False,
        **deps: str) -> dict[str, Any]:
    """Build and train stage ``name``; its output goes to ``out_dir`` (``resume``: from its checkpoint)."""
    stage = build(name, config, **deps)
    return train_stage(stage, getattr(config, name), out_dir, config, progress=progress, resume=resume)
