"""Batched greedy decoding on any Hugging Face causal LM: the primitives every predictor and model uses.

Prompts are left-padded so that every row's prompt ends at the same column and ``generate`` decodes all
rows together (no Python loop over the batch). Nothing here knows a method: the models (student, implicit)
and the evaluation build on it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext

import torch
from transformers import PreTrainedModel, StoppingCriteria, StoppingCriteriaList

from icot.tokenizer import Layout


def context_length(model: PreTrainedModel) -> int | None:
    """Longest sequence the model's positions allow (None when not bounded by config)."""
    cfg = model.config
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            return value
    return None


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``(input_ids, attention_mask)``, both (B, T)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # building the batch, not the hot path
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into ``(input_ids, attention_mask)``, both (B, T)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):  # building the batch (in the DataLoader when training), not the hot path
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


class StopAfterEos(StoppingCriteria):
    """Stop a row once it has generated ``count`` end-of-text tokens.

    The explicit layout uses the same token for ``<sep>`` and ``<eos>`` (as the papers do with GPT-2),
    so the teacher must stop at its second one, not its first.
    """

    def __init__(self, eos_id: int, count: int, prompt_length: int):
        self.eos_id, self.count, self.prompt_length = eos_id, count, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        generated = input_ids[:, self.prompt_length:]  # (B, t)
        return (generated == self.eos_id).sum(dim=1) >= self.count  # (B,)


def shifted_positions(width: int, s1: torch.Tensor, shift: int | torch.Tensor) -> torch.Tensor:
    """Position ids (B, width) of right-padded rows whose positions from ``s1`` on move right by ``shift``:
    the layout of a stepwise model trained with ``keep_position`` (the removed CoT tokens' positions stay
    taken, and the first ``<sep>`` moves up next to what is left, as the original code does).

    Args:
        width: columns.
        s1: (B,) position of the first ``<sep>``.
        shift: scalar or (B,) tokens removed after ``s1``.
    """
    pos = torch.arange(width, device=s1.device)[None, :]  # (1, T)
    return pos + (pos >= s1[:, None]) * torch.as_tensor(shift, device=s1.device).reshape(-1, 1)


@contextmanager
def positions_moved(model: PreTrainedModel, attention_mask: torch.Tensor, shift: int):
    """While ``generate`` runs on left-padded prompts ending in ``<sep>``, move every position from that
    ``<sep>`` on right by ``shift`` (see :func:`shifted_positions`).

    ``generate`` numbers the prompt's tokens ``cumsum(mask) - 1``, so a row's ``<sep>`` is at its token
    count - 1; a pre-hook moves the ``position_ids`` it passes to every forward (or, for a model whose
    ``generate`` passes none, numbers the forward's tokens the same way from its attention mask first).
    """
    sep = attention_mask.sum(1, keepdim=True) - 1  # (B, 1)

    def move(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        positions = kwargs.get("position_ids")
        if positions is None:
            ids, mask = kwargs["input_ids"], kwargs["attention_mask"]  # (B, t), (B, past + t)
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        kwargs["position_ids"] = positions + (positions >= sep) * shift
        return args, kwargs

    handle = model.register_forward_pre_hook(move, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def greedy_generate(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, layout: Layout,
                    n_eos: int, max_new_tokens: int, position_shift: int = 0) -> torch.Tensor:
    """Greedy decoding until ``n_eos`` end-of-text tokens per row; returns only the new tokens (B, t).

    The budget is capped so that prompt plus answer stay inside the model's context; ``position_shift``
    moves positions from the ``<sep>`` on (:func:`positions_moved`).
    """
    prompt_length = input_ids.shape[1]
    limit = context_length(model)
    if limit is not None:
        max_new_tokens = min(max_new_tokens, limit - prompt_length - position_shift)
    if max_new_tokens < 1:
        raise ValueError(f"a prompt of {prompt_length} tokens leaves no room to answer in a context of {limit}")
    # generate() fills every unset field from model.generation_config, whose eos_token_id would stop
    # the teacher at its first <sep>: stopping is StopAfterEos's job alone, so that field is blanked.
    config = copy.deepcopy(model.generation_config)
    config.update(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=layout.pad_id,
                  eos_token_id=None, bos_token_id=None)
    saved = model.generation_config
    model.generation_config = config
    try:
        stop = StoppingCriteriaList([StopAfterEos(layout.eos_id, n_eos, prompt_length)])
        with positions_moved(model, attention_mask, position_shift) if position_shift else nullcontext():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, stopping_criteria=stop)
    finally:
        model.generation_config = saved
    return out[:, prompt_length:]
