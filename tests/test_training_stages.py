"""The stage registry: what each stage depends on and reads, and how it is built by name."""

from __future__ import annotations

import dataclasses

import pytest

from icot.config import load_config
from icot.errors import ConfigError
from icot.training import stages
from icot.training.causal_lm import CausalLMStage
from icot.training.loop import Stage


def test_registry_covers_every_training_section_in_order():
    assert stages.ORDER == ("teacher", "nocot", "student", "emulator", "couple", "stepwise")
    config = load_config()
    for name, entry in stages.REGISTRY.items():
        assert name in entry.depends and "data" in entry.depends and "model" in entry.depends
        assert all(dataclasses.is_dataclass(getattr(config, section)) for section in entry.depends)
        assert set(entry.needs) <= set(stages.ORDER[: stages.ORDER.index(name)])  # reads earlier stages only
    assert stages.spec("couple").directory == "implicit"


def test_stepwise_from_scratch_neither_reads_nor_depends_on_the_teacher():
    config = load_config()
    scratch = dataclasses.replace(config, si=dataclasses.replace(config.si, from_teacher=False))
    assert stages.needs("stepwise", config) == ("teacher",) and "teacher" in stages.depends("stepwise", config)
    assert stages.needs("stepwise", scratch) == () and "teacher" not in stages.depends("stepwise", scratch)
    assert "si" in stages.depends("stepwise", scratch)
    assert stages.depends("student", scratch) == stages.depends("student", config)


def test_build_by_name_and_refusals(tiny_config):
    stage = stages.build("teacher", tiny_config)
    assert isinstance(stage, CausalLMStage) and isinstance(stage, Stage) and stage.name == "teacher"
    with pytest.raises(ConfigError, match="unknown stage 'tutor'"):
        stages.build("tutor", tiny_config)
    with pytest.raises(ConfigError, match="needs --teacher DIR"):
        stages.build("student", tiny_config)
    with pytest.raises(ConfigError, match="needs --student DIR"):
        stages.build("couple", tiny_config)
