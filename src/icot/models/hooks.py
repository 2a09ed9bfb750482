"""Read and write the hidden states entering each decoder block, on any HF decoder-only causal LM.

This is the mechanism the ICoT models write hidden states with (the mind-reading student and the thought
emulator): a forward pre-hook on every decoder block, registered only while an edit is armed. The teacher's
states need no hook: they are ``output_hidden_states`` of its own unedited forward pass (the same tensors as
the block inputs; :func:`read_states` reads those through the hooks, and the tests check that the two agree). No modeling file is forked, so any
architecture whose blocks ``find_blocks`` locates works unchanged, including under activation checkpointing
(transformers >= 5.23, the project's floor, checkpoints a block's ``forward``, not its ``__call__``, so the
pre-hooks run once, outside the checkpoint).

Conventions: ``B`` batch, ``T`` sequence length, ``H`` hidden size, ``L`` number of blocks. ``h[l]`` is the input of
block ``l``, the same tensor as ``output_hidden_states[l]`` for ``l = 0..L-1`` when nothing is edited.

While editing, ``output_hidden_states`` mixes both sides of the edit: transformers 5 records entry 0 from block 0's
(already edited) input and entry ``l >= 1`` from block ``l-1``'s output, i.e. before the edit at block ``l``. Read
states with :func:`read_states` or an edit function instead.

Example:
    editor = HiddenStateEditor(model)
    with editor.edit(s1, lambda l, cur: mlps[l](z[:, l])):  # write MLP_l(z_l) at s1 before block l
        logits = model(input_ids, attention_mask=mask).logits
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

# Attribute paths of the decoder blocks, tried in order. Full causal-LM paths first, then the bare base models
# (``GPT2Model.h``, ``LlamaModel.layers``, ``OPTModel.decoder.layers``).
_BLOCK_PATHS = (
    "transformer.h",  # GPT-2, GPT-J, Bloom
    "model.layers",  # Llama, Mistral, Qwen, Gemma, Phi
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "h",
    "layers",
    "decoder.layers",
)

EditFn = Callable[[int, torch.Tensor], "torch.Tensor | None"]

def _get_path(obj: object, path: str) -> object | None:
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Hugging Face decoder-only model, in execution order.

    Args:
        model: a causal LM (``GPT2LMHeadModel``, ``LlamaForCausalLM``, ...) or its base model.

    Returns:
        The ``nn.ModuleList`` of blocks; block ``l`` receives ``h[l]``.

    Raises:
        ValueError: if no block list is found, naming the model class.
    """
    for path in _BLOCK_PATHS:
        blocks = _get_path(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return blocks
    # Unknown architecture: the block list is the one ModuleList as long as the config says there are layers.
    config = getattr(model, "config", None)
    n_layers = getattr(config, "num_hidden_layers", None) if config is not None else None
    if isinstance(n_layers, int) and n_layers > 0:
        candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
        if len(candidates) == 1:
            return candidates[0]
        detail = f"{len(candidates)} ModuleLists of length num_hidden_layers={n_layers}"
    else:
        detail = "no config.num_hidden_layers to match a ModuleList against"
    raise ValueError(
        f"cannot find the decoder blocks of {type(model).__name__}: none of "
        f"{', '.join(_BLOCK_PATHS)} is a ModuleList, and {detail}"
    )


@dataclass
class _Edit:
    """One armed edit: where to look, what to call, and whether it lasts one forward pass only."""

    positions: torch.Tensor  # (B,) long
    fn: EditFn
    once: bool
    max_position: int  # positions.max(), kept as an int so the hooks need no device sync to validate it


class HiddenStateEditor:
    """Forward pre-hooks on every decoder block that read and write ``h[l]`` at one position per batch row.

    The hooks exist only while armed by :meth:`edit` (a ``once`` edit removes them as soon as its forward pass is
    done), so unedited passes, such as ``generate``'s cached decoding steps, run at the model's own speed. Use one
    editor per model; close it (or use it as a context manager) when done.

    Args:
        model: a Hugging Face decoder-only model; its blocks are found by :func:`find_blocks`.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.blocks = find_blocks(model)
        self.n_layers = len(self.blocks)
        self._edit: _Edit | None = None
        self._closed = False
        self._handles: list = []  # the registered hooks, present only while an edit is armed

    def _attach(self) -> None:
        self._handles = [
            block.register_forward_pre_hook(self._make_hook(layer), with_kwargs=True)
            for layer, block in enumerate(self.blocks)
        ]

    def _detach(self) -> None:
        # Safe inside a hook: a module copies its hook dict before iterating over it.
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def armed(self) -> bool:
        """Whether the next block call will be edited."""
        return self._edit is not None

    @contextlib.contextmanager
    def edit(self, positions: torch.Tensor, fn: EditFn, once: bool = False) -> Iterator[HiddenStateEditor]:
        """Arm the hooks for the duration of the ``with`` block.

        Before block ``l`` runs, ``fn(l, cur)`` is called with ``cur = h[l][arange(B), positions]`` (B, H). If it
        returns a tensor ``v`` (B, H), the block receives ``h[l]`` with row b's position ``positions[b]`` replaced by
        ``v[b]`` (differentiable w.r.t. ``v`` and ``h``); if it returns ``None``, ``h[l]`` passes unchanged.

        Args:
            positions: (B,) integer positions, one per batch row.
            fn: ``fn(layer, cur) -> v or None``.
            once: edit one full forward pass (blocks ``0..L-1``) and then disarm, so that ``generate`` edits only
                the prefill and never the cached decoding steps. Without it, every forward pass inside the ``with``
                block is edited, and one whose sequence is shorter than a position raises.

        Yields:
            The editor itself.

        Raises:
            RuntimeError: if the editor is already armed or closed.
            ValueError: if ``positions`` is not a (B,) integer tensor of non-negative values.
        """
        if self._closed:
            raise RuntimeError("HiddenStateEditor is closed")
        if self._edit is not None:
            raise RuntimeError("HiddenStateEditor is already armed: nested edit() contexts are not supported")
        if not isinstance(positions, torch.Tensor) or positions.dim() != 1 or positions.is_floating_point():
            raise ValueError(f"positions must be a (B,) integer tensor, got {_describe(positions)}")
        if positions.numel() == 0:
            raise ValueError("positions is empty")
        positions = positions.long()
        # One sync here instead of one per block; negative indices would silently wrap around.
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0:
            raise ValueError(f"positions must be >= 0, got min {lo}")
        self._edit = _Edit(positions=positions, fn=fn, once=once, max_position=hi)
        self._attach()
        try:
            yield self
        finally:
            self._edit = None
            self._detach()

    def close(self) -> None:
        """Disarm and refuse further edits; the model runs as if no editor had existed."""
        self._closed = True
        self._edit = None
        self._detach()

    def __enter__(self) -> HiddenStateEditor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _make_hook(self, layer: int):
        # Registered only while an edit is armed (see _attach/_detach), so there is always an edit to apply.
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            return self._apply(layer, module, self._edit, args, kwargs)

        return hook

    def _apply(self, layer: int, module: nn.Module, edit: _Edit, args: tuple, kwargs: dict):
        # transformers 5 passes the hidden states positionally to GPT-2, Llama and NeoX blocks (required for
        # reentrant gradient checkpointing); accept a keyword too for other architectures.
        if args and isinstance(args[0], torch.Tensor):
            h, in_kwargs = args[0], False
        elif isinstance(kwargs.get("hidden_states"), torch.Tensor):
            h, in_kwargs = kwargs["hidden_states"], True
        else:
            raise RuntimeError(
                f"block {layer} ({type(module).__name__}) was called without hidden states as its first positional "
                "argument or as the keyword 'hidden_states'"
            )
        if h.dim() != 3:
            raise RuntimeError(
                f"block {layer} ({type(module).__name__}) got hidden states of shape {tuple(h.shape)}, "
                "expected (B, T, H)"
            )
        B, T, H = h.shape
        if edit.positions.shape[0] != B:
            raise ValueError(f"positions has {edit.positions.shape[0]} rows but block {layer} got a batch of {B}")
        if edit.max_position >= T:
            raise ValueError(
                f"position {edit.max_position} is outside the sequence of length {T} entering block {layer}; "
                "during generate(), arm the editor with once=True so that only the prefill is edited"
            )
        if edit.once and layer == self.n_layers - 1:
            # Disarm before calling fn so that an exception in fn cannot leave a once-edit armed for decoding,
            # and drop the hooks so that the decoding steps pay nothing for them.
            self._edit = None
            self._detach()

        positions = edit.positions.to(h.device)  # (B,)
        rows = torch.arange(B, device=h.device)  # (B,)
        cur = h[rows, positions]  # (B, H)
        v = edit.fn(layer, cur)
        if v is None:
            return None
        if v.shape != (B, H):
            raise ValueError(f"edit function returned shape {tuple(v.shape)} for block {layer}, expected {(B, H)}")
        v = v.to(device=h.device, dtype=h.dtype)  # (B, H)
        # One-hot mask instead of an in-place index_put: keeps h intact for autograd and needs no loop over rows.
        mask = (torch.arange(T, device=h.device)[None, :] == positions[:, None]).unsqueeze(-1)  # (B, T, 1)
        new_h = torch.where(mask, v[:, None, :], h)  # (B, T, H)
        if in_kwargs:
            return args, {**kwargs, "hidden_states": new_h}
        return (new_h, *args[1:]), kwargs


def read_states(
    model_or_editor: nn.Module | HiddenStateEditor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    positions: torch.Tensor,
) -> torch.Tensor:
    """The input of every decoder block at one position per row, from one forward pass.

    Gradient mode is the caller's: wrap in ``torch.no_grad()`` to read a frozen model.

    Args:
        model_or_editor: a model (a temporary editor is attached and removed) or an idle editor.
        input_ids: (B, T) token ids.
        attention_mask: (B, T) or None.
        positions: (B,) positions to read.

    Returns:
        (B, L, H): ``h[l][b, positions[b]]``.
    """
    if isinstance(model_or_editor, HiddenStateEditor):
        editor, owned = model_or_editor, False
    else:
        editor, owned = HiddenStateEditor(model_or_editor), True
    states: list[torch.Tensor | None] = [None] * editor.n_layers

    def record(layer: int, cur: torch.Tensor) -> None:
        states[layer] = cur  # (B, H)

    try:
        with editor.edit(positions, record):
            editor.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        if owned:
            editor.close()
    missing = [layer for layer, s in enumerate(states) if s is None]
    if missing:
        raise RuntimeError(f"blocks {missing} of {type(editor.model).__name__} did not run during the forward pass")
    return torch.stack(states, dim=1)  # (B, L, H)


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__
