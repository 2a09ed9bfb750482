"""Stage ``nocot``: the baseline that answers directly, trained on ``INPUT <sep> ANSWER <eos>``."""

from __future__ import annotations

from icot.config import IcotConfig
from icot.training.causal_lm import CausalLMStage


def build(config: IcotConfig) -> CausalLMStage:
    """The no-CoT stage of ``config`` (section ``nocot``).

    A from-scratch vocabulary is built from the same training file as the teacher's, so both models
    read the same symbols with the same ids.
    """
    return CausalLMStage("nocot", config, config.nocot, with_cot=False)
