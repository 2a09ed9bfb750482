"""Stage ``emulator``: thought emulation (METHOD.md, ICoT-KD step 3).

The emulator reads only ``INPUT <sep>``; at each layer it predicts the teacher's state ``z_l`` from
its own state at ``<sep>`` and writes a vector back there. Loss: ``sum_l ||ẑ_l - z_l||^2 / 2`` averaged
over the batch, plus, with K > 1 mixture components, the classification loss of the component that
the teacher's CoT token at ``t_l`` selects.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from icot.config import IcotConfig
from icot.models.emulator import ThoughtEmulator, component_loss, state_loss
from icot.tokenizer import Layout
from icot.training.causal_lm import chunks, to_device
from icot.training.distill import (
    FrozenTeacher,
    PairedItem,
    kd_data,
    kd_start,
    paired_batch,
)
from icot.training.distributed import shard, sum_across, sum_tensor_across
from icot.training.loop import Stage


class EmulatorWithTeacher(nn.Module):
    """The trainable emulator beside the frozen teacher whose states it learns to predict."""

    def __init__(self, emulator: ThoughtEmulator, teacher: FrozenTeacher, mixture_loss_weight: float):
        super().__init__()
        self.emulator, self.teacher = emulator, teacher
        self.mixture_loss_weight = mixture_loss_weight

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, parts, _, _ = self.scored(batch)
        return loss, parts

    def scored(self, batch: dict[str, torch.Tensor], inferred: bool = False
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """``(loss, parts, z, ẑ)``: the training loss and its parts, the teacher's states z (B, L, H) and, with
        ``inferred``, the states the emulator predicts at inference, from its own mixture choices (B, L, H)
        (the teacher-forced ones when there is no mixture: the same states), else None."""
        z, positions = self.teacher.states(batch)  # (B, L, H), (B, L)
        k = self.emulator.mixture.num_embeddings
        # The component of layer l is the teacher's CoT token at t_l (METHOD.md), folded into K classes.
        components = batch["teacher_input_ids"].gather(1, positions) % k if k > 1 else None  # (B, L)
        out = self.emulator(batch["input_ids"], batch["attention_mask"], batch["s1"], components)
        parts = {"state_loss": state_loss(out.states, z)}
        if out.component_logits is not None:
            parts["component_loss"] = component_loss(out.component_logits, components)
        loss = parts["state_loss"] + self.mixture_loss_weight * parts.get("component_loss", 0.0)
        states = None
        if inferred:
            states = out.states if components is None else \
                self.emulator(batch["input_ids"], batch["attention_mask"], batch["s1"]).states
        return loss, parts, z, states


class StateFit:
    """How well predicted teacher states fit the true ones, per layer, accumulated over batches: R² (1: perfect,
    0: no better than always predicting the mean state).

    ``R²_l = 1 - sum ||ẑ_l - z_l||² / sum ||z_l - mean(z_l)||²``, sums over examples, the mean per dimension over
    all of them. Under several processes, ``r2(across=True)`` adds every process's sums (a collective call).

    Args:
        n_layers: L.
        hidden_size: H.
    """

    def __init__(self, n_layers: int, hidden_size: int):
        self.shape = (n_layers, hidden_size)
        self.sum_z = torch.zeros(n_layers, hidden_size, dtype=torch.float64)  # (L, H) sum of z
        self.sum_sq = torch.zeros(n_layers, dtype=torch.float64)  # (L,) sum of ||z_l||²
        self.sse = torch.zeros(n_layers, dtype=torch.float64)  # (L,) sum of ||ẑ_l - z_l||²
        self.n = 0

    def add(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count a batch: ``pred`` ẑ and ``target`` z, both (B, L, H)."""
        if pred.shape != target.shape or tuple(pred.shape[1:]) != self.shape:
            raise ValueError(f"states of shapes {tuple(pred.shape)} and {tuple(target.shape)}, expected (B, *{self.shape})")
        pred, target = pred.detach().cpu().double(), target.detach().cpu().double()  # float64 on the CPU (MPS has none)
        self.sum_z += target.sum(0)
        self.sum_sq += (target ** 2).sum((0, 2))
        self.sse += ((pred - target) ** 2).sum((0, 2))
        self.n += target.shape[0]

    def r2(self, across: bool = True) -> list[float | None]:
        """R² per layer; None for a layer whose teacher state is the same for every example (nothing to explain).

        Args:
            across: add every process's sums first (a collective call: every process must make it); False when
                this process alone saw all the examples.
        """
        L, H = self.shape
        flat = torch.cat([self.sum_z.flatten(), self.sum_sq, self.sse, torch.tensor([float(self.n)], dtype=torch.float64)])
        total = sum_tensor_across(flat) if across else flat
        sum_z, sum_sq, sse, n = total[: L * H].view(L, H), total[L * H: L * H + L], total[L * H + L: L * H + 2 * L], total[-1]
        sst = sum_sq - (sum_z ** 2).sum(1) / n.clamp(min=1)  # (L,) sum ||z_l - mean||²
        # A constant state leaves only rounding in sst: count it as nothing to explain.
        scale = sum_sq.clamp(min=1e-30)
        return [None if s <= 1e-9 * q else float(1 - e / s) for s, e, q in zip(sst.tolist(), sse.tolist(), scale.tolist())]


def r2_metrics(r2: list[float | None]) -> dict[str, float]:
    """``r2`` (the mean over layers with a varying teacher state) and ``r2_layer_<l>`` for each of those layers."""
    defined = {l: v for l, v in enumerate(r2) if v is not None}
    if not defined:  # no layer to score: nothing rather than a NaN in metrics.jsonl
        return {}
    return {"r2": sum(defined.values()) / len(defined), **{f"r2_layer_{l}": v for l, v in defined.items()}}


class EmulatorStage(Stage):
    """Train a thought emulator against a frozen teacher."""

    name = "emulator"
    # The emulator reads the states entering each block: its LM's last block and final norm get no gradient.
    unused_parameters = True

    def __init__(self, config: IcotConfig, teacher_dir: str):
        self.config, self.cfg = config, config.emulator
        teacher, lm, tokenizer = kd_start(config, self.cfg, teacher_dir)
        self.tokenizer, self.layout = tokenizer, Layout(tokenizer)
        emulator = ThoughtEmulator(lm, mixture_size=config.kd.mixture_size)
        self.module = EmulatorWithTeacher(emulator, teacher, config.kd.mixture_loss_weight)
        self.train_items, self.valid_items = kd_data(config, self.layout, teacher.lm)

    def collate(self, items: Sequence[PairedItem]) -> dict[str, torch.Tensor]:
        return paired_batch(items, self.layout.pad_id)

    def loss(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        loss, parts = module(batch)
        return loss, {k: v.detach() for k, v in parts.items()}  # read back by the loop when it logs

    def validate(self, module: nn.Module) -> dict[str, float]:
        """Mean validation loss, and the R² per layer of the states the emulator predicts at inference against the
        teacher's (``r2``, ``r2_layer_<l>``: :class:`StateFit`); the emulator answers nothing on its own, so
        ``accuracy`` is 0.

        Each process scores its own shard of the items (see :mod:`icot.training.distributed`).
        """
        device = next(module.parameters()).device
        total, n = 0.0, 0
        fit = StateFit(module.emulator.n_layers, module.emulator.hidden_size)
        for chunk in chunks(shard(self.valid_items), self.cfg.eval_batch_size):
            loss, _, z, inferred = module.scored(to_device(paired_batch(chunk, self.layout.pad_id), device), inferred=True)
            total, n = total + loss.item() * len(chunk), n + len(chunk)
            fit.add(inferred, z)  # R² of what the emulator predicts at inference
        sums = sum_across({"loss": total, "n": n})
        return {"loss": sums["loss"] / sums["n"], "accuracy": 0.0, "examples": sums["n"], **r2_metrics(fit.r2())}

    def save(self, module: nn.Module, path: Path) -> None:
        module.emulator.save_pretrained(path, self.tokenizer, {"teacher_states": self.config.kd.subset}, self.config)


def build(config: IcotConfig, teacher_dir: str) -> EmulatorStage:
    """The emulator stage of ``config`` (section ``emulator``), distilling from ``teacher_dir``."""
    return EmulatorStage(config, teacher_dir)
