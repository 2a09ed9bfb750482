"""Stage ``student``: mind-reading the teacher (METHOD.md, ICoT-KD step 2).

The student reads ``INPUT <sep> ANSWER <eos>``; before each layer l its state at the first ``<sep>``
is replaced by ``MLP_l(z_l)`` of the frozen teacher's state. Cross-entropy on ANSWER only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from icot.config import IcotConfig
from icot.models.student import MindReadingStudent
from icot.tokenizer import Layout
from icot.training.causal_lm import (
    prompts_of,
)
from icot.training.distill import AnswerStage, FrozenTeacher, kd_data, kd_start


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
        return layout.answers(new)


class StudentStage(AnswerStage):
    """Train a mind-reading student against a frozen teacher."""

    name = "student"

    def __init__(self, config: IcotConfig, teacher_dir: str):
        self.config, self.cfg = config, config.student
        teacher, lm, tokenizer = kd_start(config, self.cfg, teacher_dir)
        self.tokenizer, self.layout = tokenizer, Layout(tokenizer)
        self.module = StudentWithTeacher(MindReadingStudent(lm), teacher)
        self.train_items, self.valid_items = kd_data(config, self.layout, teacher.lm)

    def save(self, module: nn.Module, path: Path) -> None:
        module.student.save_pretrained(path, self.tokenizer, {"teacher_states": self.config.kd.subset}, self.config)


def build(config: IcotConfig, teacher_dir: str) -> StudentStage:
    """The student stage of ``config`` (section ``student``), distilling from ``teacher_dir``."""
    return StudentStage(config, teacher_dir)
