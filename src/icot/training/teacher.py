"""Stage ``teacher``: the explicit-CoT model, trained on ``INPUT <sep> COT <sep> ANSWER <eos>``."""

from __future__ import annotations

from icot.config import IcotConfig
from icot.training.causal_lm import CausalLMStage


def build(config: IcotConfig) -> CausalLMStage:
    """The teacher stage of ``config`` (section ``teacher``)."""
    return CausalLMStage("teacher", config, config.teacher, with_cot=True)
