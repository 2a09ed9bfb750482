"""Teacher states for ICoT-KD: which hidden state ``z_l`` to take for each layer, and taking it.

For layer ``l`` of ``L``, ``z_l = LayerNorm(h[layers[l]][positions[l]])`` with a parameter-free LayerNorm, where
``h[k]`` is ``output_hidden_states[k]`` (the input of block ``k``) and, with ``s1`` / ``s2`` the first / second
``<sep>`` of a row (see METHOD.md, "ICoT-KD", step 1):

============  =============  ==================================================
subset        layers[l]      positions[l]
============  =============  ==================================================
diagonal      l              t_l (below)
first_column  l              s1
last_column   l              s2   (the original code wrongly used s1 here)
top_row       L - 1          t_l
bottom_row    0              t_l
============  =============  ==================================================

``t_l = min(round(s1 + l * (s2 - s1) / (L - 1)), s2)`` for ``delta="dynamic"`` (per row: rows may have CoTs of
different lengths; the original code reused the first row's delta for the whole batch), or
``t_l = min(s1 + l * delta, s2)`` for an integer ``delta``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from icot.config import SUBSETS


def _read_back_is_free(device: torch.device) -> bool:
    """Whether a check may read a value back from ``device``: free on a CPU in eager mode; on a GPU it stalls each
    step, and inside a compiled graph it is a graph break."""
    return device.type == "cpu" and not torch.compiler.is_compiling()


def _dynamic_positions(s1: torch.Tensor, s2: torch.Tensor, n_layers: int) -> torch.Tensor:
    """``round(s1 + l * (s2 - s1) / (L - 1))`` for every row and layer, exactly, rounding half to even.

    Integer arithmetic instead of floats so that ties (e.g. ``s2 - s1 = 3``, ``L = 3``, ``l = 1``: 1.5) are
    decided exactly rather than by float error; half-to-even is what ``torch.round`` and Python's ``round`` do,
    and what the original code (``torch.round`` on floats) does whenever its float result is exact.
    With a single layer the diagonal degenerates to ``t_0 = s1``.

    Returns:
        (B, L) long.
    """
    layer = torch.arange(n_layers, device=s1.device)  # (L,)
    if n_layers == 1:
        return s1[:, None].expand(-1, 1).clone()
    den = n_layers - 1
    num = layer[None, :] * (s2 - s1)[:, None]  # (B, L), exact l * (s2 - s1)
    q = torch.div(num, den, rounding_mode="floor")  # (B, L)
    r2 = 2 * (num - q * den)  # (B, L), twice the remainder, compared with den to locate the half
    base = s1[:, None] + q  # (B, L): round down
    up = (r2 > den) | ((r2 == den) & (base % 2 == 1))  # above half, or exactly half and base is odd
    return base + up.long()


def teacher_positions(
    s1: torch.Tensor,
    s2: torch.Tensor,
    n_layers: int,
    subset: str = "diagonal",
    delta: str | int = "dynamic",
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each layer ``l``, which layer's hidden state to read and at which position.

    Args:
        s1: (B,) position of the first ``<sep>`` per row.
        s2: (B,) position of the second ``<sep>`` per row; must be > s1.
        n_layers: L, the number of decoder blocks.
        subset: one of ``SUBSETS``.
        delta: ``"dynamic"`` or a non-negative int step (a string of digits is accepted too).

    Returns:
        ``(layers, positions)``: (L,) long indices into ``output_hidden_states`` and (B, L) long positions.

    Raises:
        ValueError: on an unknown subset or delta, ``n_layers < 1``, mismatched shapes, or ``s2 <= s1`` (checked
            for tensors on the CPU only, see below).
    """
    if subset not in SUBSETS:
        raise ValueError(f"unknown teacher-state subset {subset!r}; valid subsets: {', '.join(SUBSETS)}")
    if isinstance(delta, str) and delta != "dynamic":
        if not delta.isdigit():
            raise ValueError(f"delta must be 'dynamic' or a non-negative integer, got {delta!r}")
        delta = int(delta)
    if isinstance(delta, bool) or not (delta == "dynamic" or (isinstance(delta, int) and delta >= 0)):
        raise ValueError(f"delta must be 'dynamic' or a non-negative integer, got {delta!r}")
    if not isinstance(n_layers, int) or isinstance(n_layers, bool) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
    s1, s2 = torch.as_tensor(s1), torch.as_tensor(s2)
    if s1.dim() != 1 or s1.shape != s2.shape:
        raise ValueError(f"s1 and s2 must both have shape (B,), got {tuple(s1.shape)} and {tuple(s2.shape)}")
    if s1.is_floating_point() or s2.is_floating_point():
        raise ValueError("s1 and s2 must be integer tensors")
    s1, s2 = s1.long(), s2.long()
    # Elsewhere the rows come from the layout's explicit encodings (``paired_batch``, ``lm_batch``), which put the
    # second <sep> after the first by construction.
    if _read_back_is_free(s1.device):
        bad = (s2 <= s1).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"second <sep> must come after the first; rows {bad} have s2 <= s1")

    B, L = s1.shape[0], n_layers
    layer = torch.arange(L, device=s1.device)  # (L,)
    if subset == "first_column":
        positions = s1[:, None].expand(B, L)
    elif subset == "last_column":
        positions = s2[:, None].expand(B, L)
    elif delta == "dynamic":
        positions = _dynamic_positions(s1, s2, L)
    else:
        positions = s1[:, None] + layer[None, :] * delta  # (B, L)
    positions = torch.minimum(positions, s2[:, None]).contiguous()  # (B, L); clip also guards the dynamic form

    if subset == "top_row":
        layers = torch.full((L,), L - 1, dtype=torch.long, device=s1.device)
    elif subset == "bottom_row":
        layers = torch.zeros(L, dtype=torch.long, device=s1.device)
    else:
        layers = layer
    return layers, positions


def extract_teacher_states(
    hidden_states: Sequence[torch.Tensor],
    s1: torch.Tensor,
    s2: torch.Tensor,
    subset: str = "diagonal",
    delta: str | int = "dynamic",
) -> torch.Tensor:
    """The teacher states ``z`` from a forward pass with ``output_hidden_states=True``.

    Args:
        hidden_states: the L+1 tensors (B, T, H) of ``output_hidden_states``; entries 0..L-1 are used (the last one
            is the output after the final norm, not the input of a block).
        s1: (B,) first ``<sep>`` positions.
        s2: (B,) second ``<sep>`` positions.
        subset: see :func:`teacher_positions`.
        delta: see :func:`teacher_positions`.

    Returns:
        (B, L, H): ``z_l`` per row, normalized by a LayerNorm without learned parameters.
    """
    if len(hidden_states) < 2:
        raise ValueError(f"hidden_states must hold L+1 >= 2 tensors, got {len(hidden_states)}")
    device = hidden_states[0].device
    layers, positions = teacher_positions(s1.to(device), s2.to(device), len(hidden_states) - 1, subset, delta)
    return gather_teacher_states(hidden_states, layers, positions)


def gather_teacher_states(hidden_states: Sequence[torch.Tensor], layers: torch.Tensor, positions: torch.Tensor
                          ) -> torch.Tensor:
    """``z`` from ``output_hidden_states`` at positions :func:`teacher_positions` gave (computed once per batch).

    Args:
        hidden_states: the L+1 tensors (B, T, H) of ``output_hidden_states``.
        layers: (L,) indices into ``hidden_states``.
        positions: (B, L) positions, one per row and layer.

    Returns:
        (B, L, H): ``z_l`` per row, normalized by a LayerNorm without learned parameters.
    """
    B, T, H = hidden_states[0].shape
    device = hidden_states[0].device
    positions = positions.to(device)
    if positions.shape[0] != B:
        raise ValueError(f"the positions have {positions.shape[0]} rows but the hidden states a batch of {B}")
    missing = [k for k, h in enumerate(hidden_states[:-1]) if h is None]
    if missing:
        raise ValueError(f"hidden_states[{missing[0]}] is None: the forward pass did not record it")
    # Elsewhere an index out of range fails inside the gather anyway.
    if _read_back_is_free(device) and positions.numel() and int(positions.max()) >= T:
        raise ValueError(f"teacher position {int(positions.max())} is outside the sequence of length {T}")
    # One gather over the stacked block inputs, no loop and no read-back of ``layers``: each row takes, for each l,
    # hidden_states[layers[l]] at positions[:, l].
    stacked = torch.stack(hidden_states[:-1])  # (L, B, T, H)
    rows = torch.arange(B, device=device)[:, None]  # (B, 1)
    z = stacked[layers.to(device)[None, :], rows, positions]  # (B, L, H)
    return F.layer_norm(z, (H,))


def find_separators(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, sep_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the first and second ``<sep>`` among the attended tokens of each row.

    The attention mask matters because ``<sep>`` is usually the pad token too (GPT-2's end-of-text).

    Args:
        input_ids: (B, T) token ids.
        attention_mask: (B, T), 1 for real tokens; None means every token is real.
        sep_id: the ``<sep>`` token id.

    Returns:
        ``(s1, s2)``, each (B,) long.

    Raises:
        ValueError: naming the rows with fewer than two ``<sep>``.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    is_sep = input_ids == sep_id  # (B, T)
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
            )
        is_sep = is_sep & attention_mask.bool()
    count = is_sep.long().cumsum(dim=1)  # (B, T): number of <sep> up to and including t
    bad = (count[:, -1] < 2).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"rows {bad} have fewer than two <sep> tokens (id {sep_id}) among attended tokens")
    # argmax returns the first maximal index, i.e. the first t where the condition holds.
    s1 = (is_sep & (count == 1)).long().argmax(dim=1)  # (B,)
    s2 = (is_sep & (count == 2)).long().argmax(dim=1)  # (B,)
    return s1, s2
