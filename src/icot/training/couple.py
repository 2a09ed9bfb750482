"""Stage ``couple``: couple and optimize (METHOD.md, ICoT-KD step 4).

The emulator's predicted states ``ẑ_l`` replace the teacher's ``z_l`` in the student, and both are
trained end to end on ``INPUT <sep> ANSWER <eos>`` with cross-entropy on ANSWER only. The teacher
and the CoT are no longer used: the result is the implicit-CoT model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from icot.config import IcotConfig
from icot.errors import CheckpointError
from icot.models.emulator import ThoughtEmulator
from icot.models.implicit import ImplicitModel
from icot.models.student import MindReadingStudent
from icot.rundir import model_path
from icot.tokenizer import Layout
from icot.training.causal_lm import check_fits, load_split, prompts_of
from icot.training.distill import AnswerStage, check_same_shape, paired_items


class Coupled(nn.Module):
    """The implicit model behind the training loop's batch interface."""

    def __init__(self, implicit: ImplicitModel):
        super().__init__()
        self.implicit = implicit

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.implicit(batch["input_ids"], batch["attention_mask"], batch["s1"], labels=batch.get("labels"))

    @torch.no_grad()
    def answers(self, batch: dict[str, torch.Tensor], layout: Layout, max_new_tokens: int) -> list[str]:
        """Greedy answers from the input alone: emulator prefill, student prefill, decoding."""
        ids, mask, s1 = prompts_of(batch, layout.pad_id)
        new = self.implicit.generate(ids, mask, s1, layout, max_new_tokens)
        return layout.answers(new)


class CoupleStage(AnswerStage):
    """Train emulator and student together as one implicit model."""

    name = "couple"
    # The emulator inside reads the states entering each block: its LM's last block and final norm get no gradient.
    unused_parameters = True

    def __init__(self, config: IcotConfig, student_dir: str, emulator_dir: str):
        self.config, self.cfg = config, config.couple
        student, self.tokenizer = MindReadingStudent.from_pretrained(model_path(student_dir))
        emulator, emulator_tokenizer = ThoughtEmulator.from_pretrained(model_path(emulator_dir))
        # The emulator's states replace the student's at every layer, and both read the same token ids.
        check_same_shape(student.lm, emulator.lm, model_path(emulator_dir) / "config.json", "student", "emulator")
        if emulator_tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise CheckpointError("the emulator's vocabulary differs from the student's (field tokenizer)",
                                  model_path(emulator_dir))
        self.layout = Layout(self.tokenizer)
        self.module = Coupled(ImplicitModel(emulator, student))
        train = load_split(config, "train")
        # Paired items carry the explicit layout too; only their no-CoT half is ever fed to the models.
        self.train_items = paired_items(self.layout, train, config.data.train)
        check_fits([it.nocot for it in self.train_items], student.lm, config.data.train)
        self.valid_items = paired_items(self.layout, load_split(config, "valid"), config.data.valid)

    def save(self, module: nn.Module, path: Path) -> None:
        module.implicit.save_pretrained(path, self.tokenizer, self.config)


def build(config: IcotConfig, student_dir: str, emulator_dir: str) -> CoupleStage:
    """The couple stage of ``config`` (section ``couple``)."""
    return CoupleStage(config, student_dir, emulator_dir)
