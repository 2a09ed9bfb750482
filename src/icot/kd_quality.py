"""ICoT-KD stage by stage: what each of its models achieves on its own, on the test file.

The pipeline's ``icot-kd`` row scores the coupled model only; when it is wrong, these say which stage
fell short (METHOD.md, "ICoT-KD"):

- the **student reading the teacher's states** of each line's reference CoT (:class:`TeacherStatesPredictor`):
  the ceiling of the method, since the emulator can at best reproduce those states;
- the **emulator's fit** to the teacher's states, as R² per layer (:func:`emulator_fit`);
- the **student reading the emulator's states before coupling** (an :class:`ImplicitModel` of the two stage
  directories): what coupling starts from.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from icot.config import IcotConfig
from icot.data import Example
from icot.devices import decode_device
from icot.errors import DataFormatError
from icot.evaluation import ImplicitPredictor, Prediction, evaluate
from icot.generation import context_length
from icot.models.emulator import ThoughtEmulator
from icot.models.implicit import ImplicitModel
from icot.models.student import MindReadingStudent
from icot.rundir import model_path
from icot.tokenizer import Layout
from icot.training.causal_lm import check_fits, chunks, to_device
from icot.training.distill import FrozenTeacher, paired_batch, paired_items
from icot.training.emulator import EmulatorWithTeacher, StateFit
from icot.training.student import StudentWithTeacher


def reference_lines(examples: Sequence[Example], path: str | Path) -> dict[str, Example]:
    """Each input's example, the CoT of which gives the teacher's states.

    Raises:
        DataFormatError: naming ``path`` and the 1-based line of an example without a CoT, or of an input that
            appears twice with different CoTs (its teacher states would be ambiguous).
    """
    by_input: dict[str, Example] = {}
    for line, ex in enumerate(examples, start=1):
        if not ex.cot:
            raise DataFormatError("no CoT: the student's ceiling reads the teacher's states of the reference CoT",
                                  path, line)
        if by_input.setdefault(ex.input, ex).cot != ex.cot:
            raise DataFormatError("this INPUT appeared earlier with another CoT: its teacher states are ambiguous",
                                  path, line)
    return by_input


class TeacherStatesPredictor:
    """Greedy answers of a mind-reading student given the teacher's states of each input's reference CoT
    (the :class:`~icot.evaluation.Predictor` protocol): the upper bound of ICoT-KD.

    Args:
        student: the trained student.
        teacher: the frozen teacher it was trained against.
        examples: the lines whose inputs will be asked, with their CoT (:func:`reference_lines`).
        path: their file, for errors.
        max_new_tokens: decoding budget per example.

    Raises:
        DataFormatError: as :func:`reference_lines`, or for a symbol the vocabulary lacks.
        ConfigError: ``FILE:LINE`` of a line too long for the teacher's context.
    """

    with_cot = False

    def __init__(self, student: MindReadingStudent, teacher: FrozenTeacher, examples: Sequence[Example],
                 path: str | Path, max_new_tokens: int = 256):
        self.module = StudentWithTeacher(student, teacher)
        self.layout = Layout(teacher.tokenizer)
        reference_lines(examples, path)
        # Tokenized once, in both layouts: the teacher reads the explicit one, the student is prompted with the other.
        items = paired_items(self.layout, examples, str(path))
        check_fits([it.explicit for it in items], teacher.lm, str(path))
        self.items = {ex.input: item for ex, item in zip(examples, items)}  # a repeated line: the same item
        self.max_new_tokens = max_new_tokens
        self.context = context_length(student.lm)

    @torch.no_grad()
    def predict(self, inputs: Sequence[str]) -> list[Prediction]:
        """Decode a batch of inputs, each with the teacher's states of its reference CoT.

        Raises:
            KeyError: for an input that is not among the reference lines.
        """
        unknown = next((x for x in inputs if x not in self.items), None)
        if unknown is not None:
            raise KeyError(f"input {unknown!r} is not among the reference lines: its teacher states are unknown")
        device = next(self.module.student.parameters()).device
        batch = to_device(paired_batch([self.items[x] for x in inputs], self.layout.pad_id), device)
        return [Prediction("", a) for a in self.module.answers(batch, self.layout, self.max_new_tokens)]


@torch.no_grad()
def emulator_fit(emulator: ThoughtEmulator, teacher: FrozenTeacher, examples: Sequence[Example], path: str | Path,
                 batch_size: int) -> list[float | None]:
    """R² per layer of the states the emulator predicts from each prompt (its own mixture choices) against the
    teacher's states of the reference CoT; None for a layer whose teacher state never varies."""
    layout = Layout(teacher.tokenizer)
    items = paired_items(layout, examples, str(path))
    check_fits([it.explicit for it in items], teacher.lm, str(path))
    device = next(emulator.parameters()).device
    pair = EmulatorWithTeacher(emulator, teacher, mixture_loss_weight=0.0)
    fit = StateFit(emulator.n_layers, emulator.hidden_size)
    for chunk in chunks(items, batch_size):
        _, _, z, inferred = pair.scored(to_device(paired_batch(chunk, layout.pad_id), device), inferred=True)
        fit.add(inferred, z)
    return fit.r2(across=False)  # this process scored every line: no sum across processes


def kd_stage_quality(config: IcotConfig, dirs: dict[str, str | Path], test: Sequence[Example],
                     progress: bool = True) -> dict[str, Any]:
    """The student's ceiling, the emulator's R² per layer and the emulator -> student pair before coupling, on
    ``test`` (``eval.limit`` applies; decoding at ``eval.batched_size``, else ``eval.batch_size``).

    Args:
        config: the run's config (``kd`` and ``eval``).
        dirs: the ``teacher``, ``student`` and ``emulator`` stage (or model) directories.
        test: the test examples, with their CoT.
        progress: show progress bars.

    Returns:
        ``{"student_with_teacher_states": E, "emulator_r2": [R² per layer], "emulator_then_student": E}`` where
        each ``E`` is ``{"accuracy", "digit_accuracy", "n"}``.

    Raises:
        DataFormatError: naming the test file and line of a line without a CoT (see :func:`reference_lines`), or
            of a symbol the teacher's vocabulary lacks.
        ConfigError: ``FILE:LINE`` of a line too long for the teacher's context.
    """
    test = list(test[: config.eval.limit or None])
    reference_lines(test, config.data.test)  # before any model loads: a line without a CoT fails at once
    place = {"device": decode_device(config.eval.device), "dtype": getattr(torch, config.eval.dtype)}
    teacher = FrozenTeacher(str(dirs["teacher"]), config.kd).to(**place)
    student, tokenizer = MindReadingStudent.from_pretrained(model_path(dirs["student"]))
    emulator, _ = ThoughtEmulator.from_pretrained(model_path(dirs["emulator"]))
    student.to(**place).eval()
    emulator.to(**place).eval()
    batch_size = config.eval.batched_size or config.eval.batch_size

    def scored(predictor) -> dict[str, Any]:
        r = evaluate(predictor, test, batch_size=batch_size, progress=progress, warmup=False)
        return {k: r[k] for k in ("accuracy", "digit_accuracy", "n")}

    ceiling = scored(TeacherStatesPredictor(student, teacher, test, config.data.test, config.eval.max_new_tokens))
    r2 = emulator_fit(emulator, teacher, test, config.data.test, batch_size)
    pair = ImplicitModel(emulator, student)
    pair.tokenizer = tokenizer
    before_coupling = scored(ImplicitPredictor(pair, config.eval.max_new_tokens))
    return {"student_with_teacher_states": ceiling, "emulator_r2": r2, "emulator_then_student": before_coupling}


__all__ = ["TeacherStatesPredictor", "emulator_fit", "kd_stage_quality", "reference_lines"]
