"""What the distillation stages share: paired items, the frozen teacher, the answer-trained stage base.

Each training item pairs the explicit layout (what the teacher reads) with the no-CoT layout of the
same example (what the student, emulator and coupled model read; they never see a CoT token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from icot.config import IcotConfig, KDConfig, TrainConfig
from icot.data import Example
from icot.errors import CheckpointError
from icot.evaluation import answers_match
from icot.models.lm import hidden_size, load_lm_dir, n_layers, require_explicit
from icot.models.teacher_states import gather_teacher_states, teacher_positions
from icot.rundir import model_path
from icot.tokenizer import Encoded, Layout
from icot.training.causal_lm import (
    answer_budget,
    check_fits,
    chunks,
    exact_match,
    lm_batch,
    load_split,
    starting_lm,
    teacher_forced_metrics,
    to_device,
)
from icot.training.distributed import shard
from icot.training.loop import Stage


@dataclass
class PairedItem:
    """One example in both layouts."""

    explicit: Encoded
    nocot: Encoded


def paired_items(layout: Layout, examples: Sequence[Example], path: str) -> list[PairedItem]:
    """Encode examples in the explicit and the no-CoT layout."""
    explicit = layout.encode_all(examples, True, path)
    nocot = layout.encode_all(examples, False, path)
    return [PairedItem(e, n) for e, n in zip(explicit, nocot)]


def paired_batch(items: Sequence[PairedItem], pad_id: int) -> dict[str, torch.Tensor]:
    """``teacher_*`` tensors of the explicit layout and the student's no-CoT tensors.

    The teacher's rows end at the batch's last second ``<sep>``: under causal attention no later token reaches a
    state at or before it, so the answer (a sixth of a 4x4 row) is not worth a forward pass. Cutting here, on the
    host, spares the device a sync that reading the cut from ``teacher_s2`` there would cost each step.
    """
    teacher = lm_batch([it.explicit for it in items], pad_id)
    end = max(it.explicit.s2 for it in items) + 1
    teacher = {k: v[:, :end] if v.dim() == 2 else v for k, v in teacher.items()}  # (B, end) rows; s1, s2 (B,)
    student = lm_batch([it.nocot for it in items], pad_id)
    return {**{f"teacher_{k}": v for k, v in teacher.items()}, **student}


class FrozenTeacher(nn.Module):
    """The teacher LM in eval mode with no gradients, giving the states to distil.

    It is an ``nn.Module`` so that it moves with the stage's module, but its parameters never
    require grad, so the training loop never hands them to the optimizer.
    """

    def __init__(self, stage_dir: str, kd: KDConfig):
        super().__init__()
        self.lm, self.tokenizer, meta = load_lm_dir(model_path(stage_dir))
        require_explicit(meta, stage_dir)
        self.lm.eval()
        self.lm.requires_grad_(False)
        self.kd = kd

    def train(self, mode: bool = True) -> "FrozenTeacher":
        # The teacher stays in eval mode (no dropout) whatever the stage module is switched to.
        return super().train(False)

    @torch.no_grad()
    def states(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher states ``z`` (B, L, H) and the positions ``t_l`` they were read at (B, L).

        The teacher reads the rows as given: ``paired_batch`` has cut them after the last second ``<sep>``.
        """
        out = self.lm(input_ids=batch["teacher_input_ids"],  # (B, T)
                      attention_mask=batch["teacher_attention_mask"], output_hidden_states=True)
        layers, positions = teacher_positions(batch["teacher_s1"], batch["teacher_s2"], len(out.hidden_states) - 1,
                                              self.kd.subset, self.kd.delta)
        return gather_teacher_states(out.hidden_states, layers, positions), positions


def kd_data(config: IcotConfig, layout: Layout, lm: nn.Module) -> tuple[list[PairedItem], list[PairedItem]]:
    """Training and validation items for a distillation stage."""
    train = load_split(config, "train")
    items = paired_items(layout, train, config.data.train)
    check_fits([it.explicit for it in items], lm, config.data.train)
    valid_items = paired_items(layout, load_split(config, "valid"), config.data.valid)
    check_fits([it.explicit for it in valid_items], lm, config.data.valid)
    return items, valid_items


def kd_start(config: IcotConfig, train_cfg: TrainConfig, teacher_dir: str
             ) -> tuple[FrozenTeacher, PreTrainedModel, PreTrainedTokenizerBase]:
    """The frozen teacher, and the LM a student or emulator starts from, with its tokenizer.

    The start is the stage's ``init_from`` when set, else the teacher's weights (``kd.init_from_teacher``),
    else the base model of the ``model`` section.
    """
    teacher = FrozenTeacher(teacher_dir, config.kd)
    init = train_cfg.init_from or (teacher_dir if config.kd.init_from_teacher else "")
    lm, tokenizer = starting_lm(config, [] if init else load_split(config, "train"), init)
    if len(tokenizer) != len(teacher.tokenizer) or tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
        raise CheckpointError("the teacher's vocabulary differs from the model this stage starts from "
                              "(field tokenizer)", teacher_dir)
    check_same_shape(teacher.lm, lm, model_path(teacher_dir) / "config.json", "teacher",
                     "model this stage starts from")
    return teacher, lm, tokenizer


def check_same_shape(reference: nn.Module, other: nn.Module, file: Path, name: str, other_name: str) -> None:
    """Refuse models whose layer counts or hidden sizes differ: one model's states feed the other's layers.

    Raises:
        CheckpointError: naming ``file`` (the reference's config) and the field that differs.
    """
    for field, size in (("n_layer", n_layers), ("hidden_size", hidden_size)):
        if size(reference) != size(other):
            raise CheckpointError(f"field '{field}': the {name} has {size(reference)} but the {other_name} has "
                                  f"{size(other)}; they must be equal", file)


class AnswerStage(Stage):
    """Base of the stages trained on answers over paired items (student, couple).

    Subclasses set ``module`` (called on a batch, returning an LM output, with an ``answers`` method
    for greedy decoding), ``layout``, ``cfg``, ``train_items`` and ``valid_items``.
    """

    layout: Layout
    cfg: TrainConfig
    valid_items: list[PairedItem]

    def collate(self, items: Sequence[PairedItem]) -> dict[str, torch.Tensor]:
        return paired_batch(items, self.layout.pad_id)

    def loss(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return module(batch).loss, {}

    def validate(self, module: nn.Module) -> dict[str, float]:
        return validate_paired(module, self.layout, self.valid_items, self.cfg.eval_batch_size,
                               self.cfg.eval_examples)


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
        correct += sum(answers_match(a, r) for a, r in zip(answers, refs))
    return {**metrics, **exact_match(correct, len(head))}
