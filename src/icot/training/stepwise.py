"""Stage ``stepwise``: stepwise internalization (ICoT-SI, METHOD.md; Deng, Choi, Shieber 2024).

Start from a model trained on explicit CoT. At removal step k (every ``si.steps_per_epoch`` optimizer
steps) the first ``k * si.remove_per_epoch`` CoT tokens are removed from every training example,
plus a random extra offset ``o`` with ``P(o) ∝ exp(-lambda o)``, and the optimizer state is reset.
Once the whole CoT is removed the example is ``INPUT <sep> ANSWER <eos>``: the model answers
directly after ``<sep>``, exactly like the no-CoT model, and only from then on are checkpoints kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from icot.config import IcotConfig, StepwiseConfig
from icot.models.lm import save_lm_dir
from icot.tokenizer import IGNORE_INDEX, Encoded
from icot.training.causal_lm import CausalLMStage, lm_batch, validate_lm


def removal_offsets(n: int, lam: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` draws of ``o >= 0`` with ``P(o) ∝ exp(-lam * o)`` (0 everywhere when ``lam`` is inf).

    ``floor(E / lam)`` with ``E ~ Exp(1)`` is exactly that geometric law: ``P(o = k) = e^{-lam k}(1 - e^{-lam})``.
    """
    if math.isinf(lam):
        return torch.zeros(n, dtype=torch.long)
    return torch.floor(torch.empty(n).exponential_(generator=generator) / lam).long()


def scheduled_removal(step: int, si: StepwiseConfig, steps_per_epoch: int) -> int:
    """CoT tokens the schedule removes at optimizer step ``step`` (before the random offset)."""
    return (step // steps_per_epoch) * si.remove_per_epoch


def remove_cot_tokens(batch: dict[str, torch.Tensor], remove: torch.Tensor, pad_id: int) -> dict[str, torch.Tensor]:
    """Drop the first ``remove[b]`` CoT tokens of each row of an explicit-layout batch.

    Rows whose whole CoT goes also lose the second ``<sep>``, becoming ``INPUT <sep> ANSWER <eos>``.
    Vectorized with one gather: new position p reads old position p (p <= s1) or p + r (p > s1).

    Args:
        batch: ``lm_batch`` of explicit-layout items (right-padded; ``s1``, ``s2`` per row).
        remove: (B,) tokens to remove per row (clipped to the row's CoT length).
        pad_id: padding token id.
    """
    ids, mask, s1, s2 = batch["input_ids"], batch["attention_mask"], batch["s1"], batch["s2"]
    cot_len = s2 - s1 - 1  # (B,)
    r = torch.minimum(remove.to(ids.device), cot_len)
    r = torch.where(r >= cot_len, cot_len + 1, r)  # all gone: the second <sep> goes too
    pos = torch.arange(ids.shape[1], device=ids.device)[None, :]  # (1, T)
    src = (pos + (pos > s1[:, None]) * r[:, None]).clamp(max=ids.shape[1] - 1)  # (B, T)
    new_mask = (pos < (mask.sum(1) - r)[:, None]).long()
    new_ids = ids.gather(1, src).masked_fill(new_mask == 0, pad_id)
    labels = new_ids.masked_fill((pos <= s1[:, None]) | (new_mask == 0), IGNORE_INDEX)
    new_s2 = torch.where(r > cot_len, torch.full_like(s2, -1), s2 - r)
    return {"input_ids": new_ids, "attention_mask": new_mask, "labels": labels, "s1": s1, "s2": new_s2}


def cut_encoded(e: Encoded, remove: int) -> Encoded:
    """One explicit-layout item with its first ``remove`` CoT tokens removed (the same rule as
    :func:`remove_cot_tokens`, for validation items)."""
    cot_len = e.s2 - e.s1 - 1
    if remove < cot_len:
        ids = e.ids[: e.s1 + 1] + e.ids[e.s1 + 1 + remove:]
        return Encoded(ids, e.s1, e.s2 - remove, e.answer_start - remove)
    ids = e.ids[: e.s1 + 1] + e.ids[e.s2 + 1:]
    return Encoded(ids, e.s1, -1, e.s1 + 1)


class StepwiseStage(CausalLMStage):
    """Fine-tune an explicit-CoT model while its CoT is removed token by token from the left."""

    def __init__(self, config: IcotConfig, init_from: str = ""):
        super().__init__("stepwise", config, config.stepwise, with_cot=True, init_from=init_from,
                         meta={"method": "icot-si"})
        self.si = config.si
        micro_batches = len(self.train_items) // config.stepwise.batch_size
        self.steps_per_epoch = self.si.steps_per_epoch or max(1, micro_batches)
        self.max_cot = max(e.s2 - e.s1 - 1 for e in self.train_items)
        self.step = 0
        self.removed = 0  # scheduled removal in force
        self.meta["layout"] = "nocot"  # only fully internalized checkpoints are ever saved

    def removal_at(self, step: int) -> int:
        """Scheduled removal at ``step``, with the remove-all rule applied."""
        n = scheduled_removal(step, self.si, self.steps_per_epoch)
        beyond = self.si.remove_all_when_remove_beyond
        return self.max_cot if (beyond and n > beyond) or n >= self.max_cot else n

    def all_removed(self) -> bool:
        """Whether the schedule now removes every CoT token of every example."""
        return self.removed >= self.max_cot

    def begin_step(self, step: int) -> bool:
        self.step = step
        removed = self.removal_at(step)
        changed = removed != self.removed
        self.removed = removed
        return changed

    def collate(self, items: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        return lm_batch(items, self.layout.pad_id)

    def loss(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        # Offsets depend only on (seed, step, row), so a resumed run draws the same ones.
        g = torch.Generator().manual_seed(self.train_cfg.seed * 1_000_003 + self.step)
        offsets = removal_offsets(batch["input_ids"].shape[0], self.si.removal_smoothing_lambda, g)
        cut = remove_cot_tokens(batch, self.removed + offsets, self.layout.pad_id)
        out = module(input_ids=cut["input_ids"], attention_mask=cut["attention_mask"], labels=cut["labels"])
        return out.loss, {"cot_removed": float(self.removed)}

    def validate(self, module: nn.Module) -> dict[str, float]:
        """Validation in the current format (scheduled removal, no offset).

        The model decodes the CoT that is left (if any), then the answer; only fully internalized
        checkpoints are eligible for keeping.
        """
        done = self.all_removed()
        items = [cut_encoded(e, self.removed) for e in self.valid_items]
        metrics = validate_lm(module, self.layout, self.valid, items, self.train_cfg, with_cot=not done)
        return {**metrics, "cot_removed": float(self.removed), "eligible": float(done)}

    def save(self, module: nn.Module, path: Path) -> None:
        save_lm_dir(path, module, self.tokenizer, self.meta, self.config)


def build(config: IcotConfig, teacher_dir: str = "") -> StepwiseStage:
    """The stepwise stage of ``config`` (section ``stepwise``), starting from ``teacher_dir`` when given."""
    return StepwiseStage(config, init_from=teacher_dir)
