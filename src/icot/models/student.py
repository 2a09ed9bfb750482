"""The mind-reading student of ICoT-KD (METHOD.md, "ICoT-KD", step 2).

A causal LM trained on ``INPUT <sep> ANSWER <eos>`` whose hidden state at the first ``<sep>`` (position ``s1``) is
replaced, before every block ``l``, by ``MLP_l(z_l)``: ``z`` are the teacher's states (step 1) or, once coupled,
the emulator's predictions (step 4). The substitution goes through :class:`~icot.models.hooks.HiddenStateEditor`,
so any Hugging Face decoder-only LM works unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutput

from icot.config import IcotConfig
from icot.generation import greedy_generate
from icot.models.checkpoint import (
    load_lm_checked,
    load_modules,
    module_dtype,
    save_lm_with_modules,
)
from icot.models.hooks import HiddenStateEditor
from icot.models.lm import hidden_size, n_layers
from icot.tokenizer import Layout

KIND = "student"


def position_ids_from_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Positions counted over attended tokens only, as ``generate`` computes them.

    A plain forward pass numbers columns ``0..T-1`` whatever the mask, so a left-padded row would be shifted; models
    with absolute positions (GPT-2) then compute different states than for the same row alone. Right-padded rows
    are unaffected (their real tokens keep ``0..n-1``).

    Args:
        attention_mask: (B, T) 1 for real tokens, or None.

    Returns:
        (B, T) long, or None when there is no mask.
    """
    if attention_mask is None:
        return None
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)  # (B, T)


def _mlp(h: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(h, 4 * h), nn.ReLU(), nn.Linear(4 * h, h))


class MindReadingStudent(nn.Module):
    """A causal LM that reads the teacher's (or emulator's) states at ``s1`` through one MLP per layer.

    Args:
        lm: any Hugging Face decoder-only causal LM.

    Attributes:
        lm: the language model.
        mlps: ``L`` MLPs ``H -> 4H -> H``; ``mlps[l]`` maps ``z_l`` to the state written before block ``l``.
        editor: the hooks on ``lm``'s blocks.
    """

    def __init__(self, lm: PreTrainedModel):
        super().__init__()
        self.lm = lm
        L, H = n_layers(lm), hidden_size(lm)
        self.mlps = nn.ModuleList(_mlp(H) for _ in range(L))
        self.editor = HiddenStateEditor(lm)

    @property
    def n_layers(self) -> int:
        """L, the number of decoder blocks."""
        return len(self.mlps)

    @property
    def hidden_size(self) -> int:
        """H, the width of the residual stream."""
        return hidden_size(self.lm)

    def substitutes(self, teacher_states: torch.Tensor) -> torch.Tensor:
        """The vectors written at ``s1``: ``MLP_l(z_l)`` for every layer.

        Args:
            teacher_states: (B, L, H) ``z``.

        Returns:
            (B, L, H).
        """
        B, L, H = teacher_states.shape
        if (L, H) != (self.n_layers, self.hidden_size):
            raise ValueError(f"teacher_states has shape {(B, L, H)}, expected (B, {self.n_layers}, {self.hidden_size})")
        z = teacher_states.to(module_dtype(self.mlps))  # (B, L, H)
        # A loop over the L layers only: each has its own MLP.
        return torch.stack([mlp(z[:, l]) for l, mlp in enumerate(self.mlps)], dim=1)  # (B, L, H)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, s1: torch.Tensor,
                teacher_states: torch.Tensor, labels: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> CausalLMOutput:
        """The LM's forward pass with ``MLP_l(z_l)`` at ``s1`` before every block ``l``.

        Args:
            input_ids: (B, T) ``INPUT <sep> ANSWER <eos>`` (padded).
            attention_mask: (B, T) or None; positions are counted over attended tokens, so left and right padding
                both work.
            s1: (B,) position of the first ``<sep>`` per row.
            teacher_states: (B, L, H) ``z``.
            labels: (B, T) with everything but ANSWER (and ``<eos>``) set to -100 by the caller; None: no loss.
            output_hidden_states: also return the LM's ``hidden_states`` (at ``s1`` they mix both sides of the
                edit: see :mod:`icot.models.hooks`; :meth:`ImplicitModel.hidden_states` gives the block inputs).

        Returns:
            The LM's output (``loss`` is the HF causal-LM loss on ``labels``, ``logits`` (B, T, V)).
        """
        v = self.substitutes(teacher_states)  # (B, L, H)
        with self.editor.edit(s1, lambda l, cur: v[:, l]):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids_from_mask(attention_mask), labels=labels, use_cache=False,
                           output_hidden_states=output_hidden_states)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, s1: torch.Tensor,
                 teacher_states: torch.Tensor, layout: Layout, max_new_tokens: int) -> torch.Tensor:
        """Greedy answer decoding; the states are substituted in the prefill only (the KV cache carries them).

        Args:
            input_ids: (B, T) left-padded ``INPUT <sep>`` prompts.
            attention_mask: (B, T).
            s1: (B,) the ``<sep>`` positions (``T - 1`` for every row of a left-padded batch).
            teacher_states: (B, L, H) ``z``.
            layout: gives the ``<eos>`` and pad ids.
            max_new_tokens: decoding budget.

        Returns:
            (B, t) the new tokens only; rows are cut at their ``<eos>`` by the caller.
        """
        v = self.substitutes(teacher_states)  # (B, L, H)
        with self.editor.edit(s1, lambda l, cur: v[:, l], once=True):
            return greedy_generate(self.lm, input_ids, attention_mask, layout, n_eos=1, max_new_tokens=max_new_tokens)

    def save_pretrained(self, path: str | Path, tokenizer: PreTrainedTokenizerBase, meta: dict[str, Any] | None = None,
                        config: IcotConfig | None = None) -> None:
        """Write a model directory: the LM and tokenizer, the MLPs, ``icot.json`` and ``config.yaml``."""
        full_meta = {"kind": KIND, "n_layer": self.n_layers, "hidden_size": self.hidden_size, **(meta or {})}
        save_lm_with_modules(path, self.lm, tokenizer, {"mlps": self.mlps}, full_meta, config)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> tuple[MindReadingStudent, PreTrainedTokenizerBase]:
        """Read back what :meth:`save_pretrained` wrote.

        Raises:
            CheckpointError: naming the file and the field or tensor that does not fit.
        """
        lm, tokenizer, _ = load_lm_checked(path, KIND)
        model = cls(lm)
        load_modules(path, {"mlps": model.mlps})
        return model, tokenizer
