"""Stage ``student``: mind-reading the teacher (METHOD.md, ICoT-KD step 2).

The student reads ``INPUT <sep> ANSWER <eos>``; before each layer l its state at the first ``<sep>``
is replaced by ``MLP_l(z_l)`` of the frozen teacher's state. Cross-entropy on ANSWER only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from icot.config import IcotConfig
from icot.evaluation import normalize_answer
from icot.models.student import MindReadingStudent
from icot.tokenizer import Layout
from icot.training.causal_lm import (answer_budget, chunks, exact_match, prompts_of, teacher_forced_metrics,
                                     to_device)
from icot.training.distributed import shard
from icot.training.frozen_teacher import PairedItem, kd_data, kd_start, paired_batch
from icot.training.loop import Stage


class StudentWithTeacher(nn.Module):
    """The trainable student beside the frozen teacher whose states it reads."""

    def __init__(self, student: MindReadingStudent, teacher: FrozenTeacher):
        super().__init__()
        self.student, self.teacher = student, teacher

    def forward(self, batch: dict[str, torch.Tensor]):
        z, _ = self.teacher.states(batch)  # (B, L, H), no grad
        return self.student(batch["input_ids"], batch["attention_mask"], batch["s1"], z, labels=batch.get("labels"))

    @torch.no_grad()
    def answers(self, batch: dict[str, torch.Tensor], layout: Layout, max_new_tokens: int) -> list[str]:
        """Greedy answers given the teacher's states of the reference CoT (the student's upper bound)."""
        z, _ = self.teacher.states(batch)
        ids, mask, s1 = prompts_of(batch, layout.pad_id)
        new = self.student.generate(ids, mask, s1, z, layout, max_new_tokens)
        return [layout.split_generation(row, with_cot=False)[1] for row in new.tolist()]


class StudentStage(Stage):
    """Train a mind-reading student against a frozen teacher."""

    name = "student"

    def __init__(self, config: IcotConfig, teacher_dir: str):
        self.config, self.cfg = config, config.student
        teacher, lm, tokenizer = kd_start(config, self.cfg, teacher_dir)
        self.tokenizer, self.layout = tokenizer, Layout(tokenizer)
        self.module = StudentWithTeacher(MindReadingStudent(lm), teacher)
        self.train_items, self.valid, self.valid_items = kd_data(config, self.layout, teacher.lm)

    def collate(self, items: Sequence[PairedItem]) -> dict[str, torch.Tensor]:
        return paired_batch(items, self.layout.pad_id)

    def loss(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return module(batch).loss, {}

    def validate(self, module: nn.Module) -> dict[str, float]:
        return validate_paired(module, self.layout, self.valid_items, self.cfg.eval_batch_size,
                               self.cfg.eval_examples)

    def save(self, module: nn.Module, path: Path) -> None:
        module.student.save_pretrained(path, self.tokenizer, {"teacher_states": self.config.kd.subset}, self.config)


def validate_paired(module: nn.Module, layout: Layout, items: Sequence[PairedItem], batch_size: int,
                    n_exact: int) -> dict[str, float]:
    """Teacher-forced answer loss over ``items`` and exact match of greedy answers on the first ``n_exact``.

    ``module(batch)`` gives logits of the no-CoT layout; ``module.answers(batch, layout, budget)`` decodes.
    Each process scores its own shard of the items (see :mod:`icot.training.distributed`).
    """
    device = next(module.parameters()).device
    batches = (to_device(paired_batch(c, layout.pad_id), device) for c in chunks(shard(items), batch_size))
    metrics = teacher_forced_metrics(lambda b: module(b).logits, batches)
    # The budget comes from all the items, so that every process decodes as one process would.
    budget = answer_budget([it.nocot for it in items[:n_exact]])
    head = shard(items[:n_exact])
    correct = 0
    for chunk in chunks(head, batch_size):
        batch = to_device(paired_batch(chunk, layout.pad_id), device)
        refs = [layout.split_generation(it.nocot.ids[it.nocot.s1 + 1:], with_cot=False)[1] for it in chunk]
        answers = module.answers(batch, layout, budget)
        correct += sum(normalize_answer(a) == normalize_answer(r) for a, r in zip(answers, refs))
    return {**metrics, **exact_match(correct, len(head))}


def build(config: IcotConfig, teacher_dir: str) -> StudentStage:
    """The student stage of ``config`` (section ``student``), distilling from ``teacher_dir``."""
    return StudentStage(config, teacher_dir)
