"""The implicit-CoT model of ICoT-KD: emulator and student coupled (METHOD.md, "ICoT-KD", step 4).

The emulator predicts the teacher states ``ẑ`` from ``INPUT <sep>``; the student reads them at ``s1`` and answers.
Both are trained end to end on ``INPUT <sep> ANSWER <eos>``; neither ever sees a CoT token.

Directory layout::

    PATH/icot.json       {"kind": "implicit"}
    PATH/config.yaml     (when given)
    PATH/<tokenizer files>
    PATH/emulator/       a ThoughtEmulator directory
    PATH/student/        a MindReadingStudent directory
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutput

from icot.config import IcotConfig, save_config
from icot.errors import CheckpointError
from icot.models.emulator import ThoughtEmulator
from icot.models.student import MindReadingStudent
from icot.rundir import META_FILE, read_meta, write_meta
from icot.tokenizer import Layout, load_tokenizer

KIND = "implicit"
EMULATOR_DIR = "emulator"
STUDENT_DIR = "student"


class ImplicitModel(nn.Module):
    """Emulator + student: answers from ``INPUT <sep>`` with the CoT reasoning carried by emulated states.

    Args:
        emulator: the thought emulator.
        student: the mind-reading student; must have the emulator's L and H.

    Attributes:
        emulator, student: the two models.
        tokenizer: set by :meth:`from_pretrained` (None otherwise); :class:`ImplicitPredictor` needs it.

    Raises:
        ValueError: when the two models have different numbers of layers or hidden sizes.
    """

    def __init__(self, emulator: ThoughtEmulator, student: MindReadingStudent):
        super().__init__()
        shapes = {"n_layer": (emulator.n_layers, student.n_layers),
                  "hidden_size": (emulator.hidden_size, student.hidden_size)}
        for field, (e, s) in shapes.items():
            if e != s:
                raise ValueError(f"emulator and student do not fit: emulator {field}={e}, student {field}={s}")
        self.emulator = emulator
        self.student = student
        self.tokenizer: PreTrainedTokenizerBase | None = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, s1: torch.Tensor,
                labels: torch.Tensor | None = None) -> CausalLMOutput:
        """The student's forward pass on the emulator's states; gradients reach both models.

        Args:
            input_ids: (B, T) ``INPUT <sep> ANSWER <eos>`` (padded).
            attention_mask: (B, T) or None.
            s1: (B,) position of the first ``<sep>``.
            labels: (B, T) masked to ANSWER by the caller, or None.

        Returns:
            The student LM's output (``loss`` on ``labels``).
        """
        z = self.emulator(input_ids, attention_mask, s1).states  # (B, L, H)
        return self.student(input_ids, attention_mask, s1, z, labels)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, s1: torch.Tensor
                      ) -> tuple[torch.Tensor, ...]:
        """The student's hidden states during its forward pass on the emulator's states (what the model computes in).

        Entry ``l < L`` is the input of the student's block ``l``: at ``s1`` the vector written there
        (``MLP_l(ẑ_l)``), elsewhere the state the earlier blocks computed on the substituted ones; entry ``L`` is
        the output after the final layer norm. (The LM's own ``output_hidden_states`` record ``s1`` before the
        edit for ``l >= 1``: :mod:`icot.models.hooks`.)

        Args:
            input_ids: (B, T) ``INPUT <sep> [MARKER] ANSWER <eos>`` (padded).
            attention_mask: (B, T) or None.
            s1: (B,) position of the first ``<sep>``.

        Returns:
            ``L + 1`` tensors (B, T, H).
        """
        z = self.emulator(input_ids, attention_mask, s1).states  # (B, L, H)
        hidden = self.student(input_ids, attention_mask, s1, z, output_hidden_states=True).hidden_states
        v = self.student.substitutes(z)  # (B, L, H) the vectors written at s1
        at_s1 = (torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
                 == s1.to(input_ids.device)[:, None])[..., None]  # (B, T, 1)
        edited = [torch.where(at_s1, v[:, l, None, :].to(h.dtype), h) for l, h in enumerate(hidden[:-1])]  # (B, T, H)
        return (*edited, hidden[-1])

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, s1: torch.Tensor, layout: Layout,
                 max_new_tokens: int) -> torch.Tensor:
        """Emulator prefill over the prompt, then the student's prefill on its states and greedy decoding.

        Args:
            input_ids: (B, T) left-padded ``INPUT <sep>`` prompts.
            attention_mask: (B, T).
            s1: (B,) the ``<sep>`` positions (``T - 1`` for every row of a left-padded batch).
            layout: gives the ``<eos>`` and pad ids.
            max_new_tokens: decoding budget.

        Returns:
            (B, t) the new tokens only.
        """
        z = self.emulator(input_ids, attention_mask, s1).states  # (B, L, H)
        return self.student.generate(input_ids, attention_mask, s1, z, layout, max_new_tokens)

    def save_pretrained(self, path: str | Path, tokenizer: PreTrainedTokenizerBase,
                        config: IcotConfig | None = None) -> None:
        """Write ``path/emulator/``, ``path/student/``, the tokenizer, ``icot.json`` and ``config.yaml``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.emulator.save_pretrained(path / EMULATOR_DIR, tokenizer)
        self.student.save_pretrained(path / STUDENT_DIR, tokenizer)
        tokenizer.save_pretrained(path)
        write_meta(path, {"kind": KIND})
        if config is not None:
            save_config(config, path / "config.yaml")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ImplicitModel:
        """Read back what :meth:`save_pretrained` wrote; the result's ``tokenizer`` is set.

        Raises:
            CheckpointError: naming the file and the problem (wrong kind, missing part, parts that do not fit).
        """
        path = Path(path)
        meta = read_meta(path)
        if meta["kind"] != KIND:
            raise CheckpointError(f"field 'kind' is '{meta['kind']}', expected '{KIND}'", path / META_FILE)
        for sub in (EMULATOR_DIR, STUDENT_DIR):
            if not (path / sub).is_dir():
                raise CheckpointError(f"missing sub-directory '{sub}/'", path)
        emulator, _ = ThoughtEmulator.from_pretrained(path / EMULATOR_DIR)
        student, _ = MindReadingStudent.from_pretrained(path / STUDENT_DIR)
        try:
            model = cls(emulator, student)
        except ValueError as e:
            raise CheckpointError(str(e), path) from None
        model.tokenizer = load_tokenizer(path)
        return model
