"""Stage ``stepwise``: stepwise internalization (ICoT-SI, METHOD.md; Deng, Choi, Shieber 2024).

Start from a model trained on explicit CoT (or from scratch, ``si.from_teacher: false``). CoT tokens
are removed from the left one at a time, as the original code does: with E optimizer steps per epoch
and ``r = si.remove_per_epoch``, step ``t`` removes ``floor(t / round(E / r))`` tokens, plus a random
extra offset ``o`` per row with ``P(o) ∝ exp(-lambda o)``; at every one-token increment the optimizer
state is reset (``si.reset_optimizer``), and no longer once the whole CoT is gone. Then the example
is ``INPUT <sep> ANSWER <eos>``: the model answers directly after ``<sep>``, exactly like the no-CoT
model, and only from then on are checkpoints kept.

Ours, off by default: ``si.advance_at`` lets a validation that reaches that exact match remove the next
token before its ``round(E / r)`` steps are up (:meth:`StepwiseStage.after_validation`), so the fixed
schedule becomes the slowest pace rather than the only one.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import torch
from torch import nn

from icot.config import IcotConfig, StepwiseConfig
from icot.errors import ConfigError
from icot.generation import shifted_positions
from icot.models.lm import require_explicit
from icot.rundir import model_path, read_meta
from icot.tokenizer import IGNORE_INDEX, Encoded
from icot.training.causal_lm import CausalLMStage, lm_batch, validate_lm


def removal_offsets(n: int, lam: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` draws of ``o >= 0`` with ``P(o) ∝ exp(-lam * o)`` (0 everywhere when ``lam`` is inf).

    ``floor(E / lam)`` with ``E ~ Exp(1)`` is exactly that geometric law: ``P(o = k) = e^{-lam k}(1 - e^{-lam})``.
    """
    if math.isinf(lam):
        return torch.zeros(n, dtype=torch.long)
    return torch.floor(torch.empty(n).exponential_(generator=generator) / lam).long()


def steps_per_token(si: StepwiseConfig, steps_per_epoch: int) -> int:
    """Optimizer steps each CoT token gets before the next one goes: ``round(E / r)`` (Python's round,
    as the original). 0 (an epoch shorter than ``r`` steps) removes a token at every step."""
    return int(round(steps_per_epoch / si.remove_per_epoch))


def remove_cot_tokens(batch: dict[str, torch.Tensor], remove: torch.Tensor, pad_id: int,
                      keep_position: bool = False) -> dict[str, torch.Tensor]:
    """Drop the first ``remove[b]`` CoT tokens of each row of an explicit-layout batch.

    Rows whose whole CoT goes also lose the second ``<sep>``, becoming ``INPUT <sep> ANSWER <eos>``.
    Vectorized with one gather: new position p reads old position p (p <= s1) or p + r (p > s1). The
    result is as wide as its longest row.

    Args:
        batch: ``lm_batch`` of explicit-layout items (right-padded; ``s1``, ``s2`` per row).
        remove: (B,) tokens to remove per row (clipped to the row's CoT length).
        pad_id: padding token id.
        keep_position: add ``position_ids`` (B, T) that move every position from ``s1`` on right by the
            row's removal (:func:`icot.generation.shifted_positions`).
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
    # The removed tokens leave padding at the right: drop the columns no row uses, so a batch whose CoT
    # is half gone costs half the compute.
    width = int(new_mask.sum(1).max())
    out = {"input_ids": new_ids[:, :width], "attention_mask": new_mask[:, :width], "labels": labels[:, :width],
           "s1": s1, "s2": new_s2}
    if keep_position:
        out["position_ids"] = shifted_positions(width, s1, r)
    return out


def cut_encoded(e: Encoded, remove: int) -> Encoded:
    """One explicit-layout item with its first ``remove`` CoT tokens removed (the same rule as
    :func:`remove_cot_tokens`, for validation items)."""
    cot_len = e.s2 - e.s1 - 1
    if remove < cot_len:
        ids = e.ids[: e.s1 + 1] + e.ids[e.s1 + 1 + remove:]
        return Encoded(ids, e.s1, e.s2 - remove, e.answer_start - remove)
    ids = e.ids[: e.s1 + 1] + e.ids[e.s2 + 1:]  # the answer marker, if any, stays
    return Encoded(ids, e.s1, -1, e.answer_start - (e.s2 - e.s1))


class StepwiseStage(CausalLMStage):
    """Fine-tune an explicit-CoT model while its CoT is removed token by token from the left."""

    def __init__(self, config: IcotConfig, init_from: str = ""):
        if init_from:
            require_explicit(read_meta(model_path(init_from)), init_from)
        super().__init__("stepwise", config, config.stepwise, with_cot=True, init_from=init_from,
                         meta={"method": "icot-si"})
        self.si = config.si
        micro_batches = len(self.train_items) // config.stepwise.batch_size
        self.steps_per_epoch = self.si.steps_per_epoch or max(1, micro_batches)
        self.per_token = steps_per_token(self.si, self.steps_per_epoch)
        self.max_cot = max(e.s2 - e.s1 - 1 for e in self.train_items)
        self.increments = self._increment_steps()  # the gate (si.advance_at) may move them earlier
        self.reset_steps = self.increments if self.si.reset_optimizer else []
        if self.si.advance_at and not config.stepwise.eval_every:
            raise ConfigError("field 'si.advance_at': the gate acts on validations; set stepwise.eval_every > 0")
        if self.si.keep_position:
            self._check_one_cot_length()
            # The internalized model answers with its positions moved by the whole CoT and second <sep>.
            self.meta["position_shift"] = self.max_cot + 1
        self.step = 0
        self.removed = 0  # scheduled removal in force
        self.meta["layout"] = "nocot"  # only fully internalized checkpoints are ever saved

    def check_budget(self) -> None:
        """Refuse a budget that ends while some CoT is left: nothing would be kept. A resumed gated run
        (``si.advance_at``) counts the removals its gate already moved earlier."""
        cfg = self.train_cfg
        total = math.ceil(cfg.epochs * (len(self.train_items) // cfg.batch_size))
        if cfg.max_steps:
            total = min(total, cfg.max_steps)
        gone = self.cot_gone_at()
        if total <= gone:
            raise ConfigError(f"field 'stepwise.max_steps': the budget of {total} optimizer steps ends before the "
                              f"CoT is gone at step {gone} ({self.max_cot} tokens, one every {self.per_token} steps); "
                              f"raise stepwise.max_steps / stepwise.epochs or si.remove_per_epoch")

    def _check_one_cot_length(self) -> None:
        """keep_position leaves a gap of the CoT's length, which inference must know: one length only."""
        lengths = {e.s2 - e.s1 - 1 for e in self.train_items}
        if len(lengths) > 1:
            raise ConfigError(f"field 'si.keep_position': needs CoTs of one length, but the training file's run "
                              f"from {min(lengths)} to {max(lengths)} tokens", self.config.data.train)

    def _rules(self, n: int) -> int:
        """The removal in force when the schedule has counted ``n`` tokens (the remove-all rule applied)."""
        beyond = self.si.remove_all_when_remove_beyond
        return self.max_cot if (beyond and n > beyond) or n >= self.max_cot else n

    def _tokens_to_go(self) -> int:
        """How many counted tokens remove the whole CoT: each one grows the removal until then."""
        beyond = self.si.remove_all_when_remove_beyond
        return min(beyond + 1, self.max_cot) if beyond else self.max_cot

    def _increment_steps(self) -> list[int]:
        """Steps at which the removal grows while some CoT was still left (the optimizer resets there);
        the last is the first step without any CoT.

        The original counts batches and adds a token when its counter reaches ``per_token``: token ``k`` at
        step ``k * per_token``; with ``per_token == 0`` it adds one at every step, the first included.
        """
        p = self.per_token
        return [k * p if p else k - 1 for k in range(1, self._tokens_to_go() + 1)]

    def removal_at(self, step: int) -> int:
        """Removal in force at optimizer step ``step``: the tokens counted up to it, the remove-all rule applied."""
        return self._rules(bisect.bisect_right(self.increments, step))

    def after_validation(self, step: int, metrics: dict[str, float]) -> None:
        """The gate of ``si.advance_at``: after ``step`` optimizer steps, a validation at or above it moves the
        next token's removal to step ``step`` and the ones after it to ``round(E / r)`` steps apart."""
        n = bisect.bisect_right(self.increments, step - 1)  # tokens counted for the step just trained
        if not self.si.advance_at or not self.per_token or n >= len(self.increments):
            return
        started = self.increments[n - 1] if n else 0
        if metrics["accuracy"] < self.si.advance_at or step - started < self.si.min_steps_per_token:
            return
        self.increments[n:] = [step + j * self.per_token for j in range(len(self.increments) - n)]

    def decisions(self) -> dict[str, list[int]]:
        return {"increments": list(self.increments)}

    def restore_decisions(self, state: dict[str, list[int]]) -> None:
        if "increments" in state:
            self.increments[:] = state["increments"]  # in place: reset_steps may be the same list

    def cot_gone_at(self) -> int:
        """The first optimizer step at which the whole CoT is removed."""
        return self.increments[-1] if self.increments else 0

    def all_removed(self) -> bool:
        """Whether the schedule now removes every CoT token of every example."""
        return self.removed >= self.max_cot

    def begin_step(self, step: int) -> bool:
        self.step = step
        self.removed = self.removal_at(step)
        i = bisect.bisect_left(self.reset_steps, step)
        return i < len(self.reset_steps) and self.reset_steps[i] == step

    def lr_scale(self, step: int) -> float:
        """Linear ramp over ``si.reset_warmup_steps`` steps after each optimizer reset."""
        warmup = self.si.reset_warmup_steps
        i = bisect.bisect_right(self.reset_steps, step)
        if not warmup or i == 0:
            return 1.0
        return min(1.0, (step - self.reset_steps[i - 1] + 1) / warmup)

    def collate(self, items: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        return lm_batch(items, self.layout.pad_id)

    def loss(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        # Offsets depend only on (seed, step, row), so a resumed run draws the same ones.
        g = torch.Generator().manual_seed(self.train_cfg.seed * 1_000_003 + self.step)
        offsets = removal_offsets(batch["input_ids"].shape[0], self.si.removal_smoothing_lambda, g)
        cut = remove_cot_tokens(batch, self.removed + offsets, self.layout.pad_id, self.si.keep_position)
        out = module(input_ids=cut["input_ids"], attention_mask=cut["attention_mask"], labels=cut["labels"],
                     position_ids=cut.get("position_ids"))
        return out.loss, {"cot_removed": float(self.removed)}

    def validate(self, module: nn.Module) -> dict[str, float]:
        """Validation in the current format (scheduled removal, no offset).

        The model decodes the CoT that is left (if any), then the answer; only fully internalized
        checkpoints are eligible for keeping.
        """
        done = self.all_removed()
        items = [cut_encoded(e, self.removed) for e in self.valid_items]
        shift = (self.max_cot + 1 if done else self.removed) if self.si.keep_position else 0
        metrics = validate_lm(module, self.layout, self.valid, items, self.train_cfg, with_cot=not done,
                              position_shift=shift)
        return {**metrics, "cot_removed": float(self.removed), "eligible": float(done)}


def build(config: IcotConfig, teacher_dir: str = "") -> StepwiseStage:
    """The stepwise stage of ``config`` (section ``stepwise``), starting from ``teacher_dir`` when given
    and ``si.from_teacher`` holds, otherwise from ``model`` (or ``stepwise.init_from``)."""
    return StepwiseStage(config, init_from=teacher_dir if config.si.from_teacher else "")
