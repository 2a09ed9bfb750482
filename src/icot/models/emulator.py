"""The thought emulator of ICoT-KD (METHOD.md, "ICoT-KD", step 3).

A causal LM reading ``INPUT <sep>`` only. Before each block ``l`` it reads its own state ``h_l`` at the first
``<sep>`` (position ``s1``), predicts the teacher state ``ẑ_l = MLP_l([h_l ; m_l])`` with ``m_l`` a mixture
embedding, runs one LSTM step over layers with dot-product attention over the earlier layers, and writes the
result back at ``s1`` so that the later blocks compute on it ("vertical" reasoning).

Details follow the original code (``modeling_gpt2_implicit.py``, mode ``forward_emulator``) where the method page
leaves them open: the LSTM input at layer ``l`` is ``ẑ_l + c_{l-1}`` (the previous attention context, zero at
``l = 0``); the attention is unscaled, its keys ``k_j = key_proj(o_j)`` also serve as values; the written vector is
``out_proj([o_l ; c_l])``.

Mixture components (K > 1): ``logits_l = h_l @ E^T`` over the K embeddings ``E``. In training the teacher's
component ids are given (teacher forcing, ``m_l = E[c_l]``) and ``logits_l`` is trained with
:func:`component_loss`; at inference ``m_l = E[argmax logits_l]``, the hard choice that teacher forcing trained
the MLPs on. (The released original code instead always uses the soft ``softmax(logits_l) @ E``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from icot.config import IcotConfig
from icot.errors import CheckpointError
from icot.models.checkpoint import (
    load_lm_checked,
    load_modules,
    module_dtype,
    save_lm_with_modules,
)
from icot.models.hooks import HiddenStateEditor
from icot.models.lm import hidden_size, n_layers
from icot.models.student import position_ids_from_mask
from icot.rundir import META_FILE

KIND = "emulator"


@dataclass
class EmulatorOutput:
    """What the emulator predicts.

    Attributes:
        states: (B, L, H) ``ẑ``, the predicted (LayerNorm-ed) teacher states.
        component_logits: (B, L, K) mixture-component logits, or None when K == 1.
    """

    states: torch.Tensor
    component_logits: torch.Tensor | None


def state_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``sum_l ||ẑ_l - z_l||^2 / 2``, averaged over the batch.

    Args:
        pred: (B, L, H).
        target: (B, L, H).

    Returns:
        A scalar.
    """
    return ((pred - target.to(pred.dtype)) ** 2).sum(dim=(1, 2)).mean() / 2


def component_loss(logits: torch.Tensor, components: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the mixture-component logits against the teacher's component ids, averaged.

    Args:
        logits: (B, L, K).
        components: (B, L) long in ``[0, K)``.

    Returns:
        A scalar.
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), components.flatten().long())


class _Recurrence:
    """The state carried across layers during one emulator forward pass."""

    def __init__(self) -> None:
        self.lstm_state: tuple[torch.Tensor, torch.Tensor] | None = None
        self.keys: list[torch.Tensor] = []  # key_proj(o_j), (B, H) each, for the layers run so far
        self.context: torch.Tensor | None = None  # (B, H) c_{l-1}
        self.states: list[torch.Tensor] = []  # ẑ_l, (B, H) each
        self.logits: list[torch.Tensor] = []  # (B, K) each


class ThoughtEmulator(nn.Module):
    """Predicts the teacher's states ``z`` from ``INPUT <sep>`` by reading and writing its own states at ``s1``.

    Args:
        lm: any Hugging Face decoder-only causal LM (only its decoder runs; the LM head is unused).
        mixture_size: K mixture components (1: none).

    Attributes:
        lm: the language model.
        mlps: ``L`` MLPs ``2H -> 4H -> H`` on ``[h_l ; m_l]``.
        mixture: the K component embeddings ``E`` (K, H).
        rnn: one-layer LSTM over layers.
        key_proj, query_proj: ``H -> H`` attention projections.
        out_proj: ``2H -> H``, from ``[o_l ; c_l]`` to the vector written at ``s1``.
        editor: the hooks on ``lm``'s blocks.
    """

    def __init__(self, lm: PreTrainedModel, mixture_size: int = 1):
        super().__init__()
        if mixture_size < 1:
            raise ValueError(f"mixture_size must be >= 1, got {mixture_size}")
        self.lm = lm
        L, H = n_layers(lm), hidden_size(lm)
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * H, 4 * H), nn.ReLU(), nn.Linear(4 * H, H)) for _ in range(L))
        self.mixture = nn.Embedding(mixture_size, H)
        self.rnn = nn.LSTM(H, H, num_layers=1)
        self.key_proj = nn.Linear(H, H)
        self.query_proj = nn.Linear(H, H)
        self.out_proj = nn.Linear(2 * H, H)
        self.editor = HiddenStateEditor(lm)

    @property
    def n_layers(self) -> int:
        """L, the number of decoder blocks."""
        return len(self.mlps)

    @property
    def hidden_size(self) -> int:
        """H, the width of the residual stream."""
        return hidden_size(self.lm)

    @property
    def mixture_size(self) -> int:
        """K, the number of mixture components."""
        return self.mixture.num_embeddings

    def _extra_modules(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in ("mlps", "mixture", "rnn", "key_proj", "query_proj", "out_proj")}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, s1: torch.Tensor,
                components: torch.Tensor | None = None) -> EmulatorOutput:
        """Emulate the teacher's states from the prompt.

        Args:
            input_ids: (B, T) token ids; only columns ``<= max(s1)`` are used (the state at ``s1`` cannot see later
                tokens in a causal LM, so dropping them changes nothing and saves the work).
            attention_mask: (B, T) or None; positions are counted over attended tokens, so left and right padding
                both work.
            s1: (B,) position of the first ``<sep>`` per row.
            components: (B, L) long teacher component ids (training, teacher forcing), or None (inference: argmax).

        Returns:
            :class:`EmulatorOutput`; ``component_logits`` is None when K == 1.
        """
        B = input_ids.shape[0]
        if components is not None and tuple(components.shape) != (B, self.n_layers):
            raise ValueError(f"components has shape {tuple(components.shape)}, expected {(B, self.n_layers)}")
        s1 = s1.to(input_ids.device)
        width = int(s1.max()) + 1
        input_ids = input_ids[:, :width]  # (B, T')
        if attention_mask is not None:
            attention_mask = attention_mask[:, :width]
        rec = _Recurrence()

        def step(layer: int, cur: torch.Tensor) -> torch.Tensor:
            return self._step(layer, cur, components, rec)

        with self.editor.edit(s1, step):
            # The base model (no LM head): its blocks are the ones the editor hooks.
            self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        if len(rec.states) != self.n_layers:
            raise RuntimeError(f"only {len(rec.states)} of {self.n_layers} blocks ran during the emulator's forward")
        states = torch.stack(rec.states, dim=1)  # (B, L, H)
        logits = torch.stack(rec.logits, dim=1) if self.mixture_size > 1 else None  # (B, L, K)
        return EmulatorOutput(states=states, component_logits=logits)

    def _step(self, layer: int, cur: torch.Tensor, components: torch.Tensor | None, rec: _Recurrence) -> torch.Tensor:
        """Layer ``layer``'s read-predict-write at ``s1``: returns the vector (B, H) written before the block."""
        h = cur.to(module_dtype(self.mlps))  # (B, H) own state entering block `layer`
        m = self._mixture_embedding(layer, h, components, rec)  # (B, H)
        z_hat = self.mlps[layer](torch.cat([h, m], dim=-1))  # (B, H)
        rec.states.append(z_hat)

        context = rec.context if rec.context is not None else torch.zeros_like(z_hat)  # (B, H) c_{l-1}
        if rec.lstm_state is None:
            rec.lstm_state = (torch.zeros_like(z_hat), torch.zeros_like(z_hat))  # nn.LSTM's zero start
        # One step over layers with the LSTM's own weights: the fused cell costs a fraction of nn.LSTM's
        # per-call overhead, which dominated the emulator's prefill at batch 1.
        rnn = self.rnn
        rec.lstm_state = torch.lstm_cell(z_hat + context, rec.lstm_state, rnn.weight_ih_l0, rnn.weight_hh_l0,
                                         rnn.bias_ih_l0, rnn.bias_hh_l0)
        out = rec.lstm_state[0]  # (B, H) o_l
        key = self.key_proj(out)  # (B, H)
        if rec.keys:
            past = torch.stack(rec.keys, dim=1)  # (B, l, H) keys of layers 0..l-1, also the values
            scores = torch.einsum("bjh,bh->bj", past, self.query_proj(out))  # (B, l)
            context = torch.einsum("bj,bjh->bh", scores.softmax(dim=-1), past)  # (B, H) c_l
        rec.keys.append(key)
        rec.context = context
        return self.out_proj(torch.cat([out, context], dim=-1))  # (B, H)

    def _mixture_embedding(self, layer: int, h: torch.Tensor, components: torch.Tensor | None,
                           rec: _Recurrence) -> torch.Tensor:
        """``m_l`` (B, H); records the component logits (B, K) when K > 1."""
        weight = self.mixture.weight  # (K, H)
        if self.mixture_size == 1:
            return weight.expand(h.shape[0], -1)  # (B, H): the single component, no choice to make
        logits = h @ weight.T  # (B, K)
        rec.logits.append(logits)
        ids = components[:, layer].to(h.device) if components is not None else logits.argmax(dim=-1)  # (B,)
        return self.mixture(ids)  # (B, H)

    def save_pretrained(self, path: str | Path, tokenizer: PreTrainedTokenizerBase, meta: dict[str, Any] | None = None,
                        config: IcotConfig | None = None) -> None:
        """Write a model directory: the LM and tokenizer, the extra modules, ``icot.json`` and ``config.yaml``."""
        full_meta = {"kind": KIND, "n_layer": self.n_layers, "hidden_size": self.hidden_size,
                     "mixture_size": self.mixture_size, **(meta or {})}
        save_lm_with_modules(path, self.lm, tokenizer, self._extra_modules(), full_meta, config)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> tuple[ThoughtEmulator, PreTrainedTokenizerBase]:
        """Read back what :meth:`save_pretrained` wrote.

        Raises:
            CheckpointError: naming the file and the field or tensor that does not fit.
        """
        lm, tokenizer, meta = load_lm_checked(path, KIND)
        k = meta.get("mixture_size")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise CheckpointError(f"field 'mixture_size' must be a positive integer, got {k!r}", Path(path) / META_FILE)
        model = cls(lm, mixture_size=k)
        load_modules(path, model._extra_modules())
        return model, tokenizer
