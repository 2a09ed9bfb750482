"""Model directories that hold a causal LM plus the method's extra modules (student MLPs, emulator heads).

Layout (see ``docs/DESIGN.md``)::

    PATH/icot.json                   {"kind": ..., "n_layer": L, "hidden_size": H, ...}
    PATH/config.yaml                 the resolved run config (when given)
    PATH/config.json, model.safetensors, tokenizer files   the Hugging Face LM
    PATH/icot_modules.safetensors    "{name}.{param}" -> tensor, for each extra module

Tensors go through ``safetensors`` only: loading a checkpoint never runs code stored in a file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from icot.config import IcotConfig
from icot.errors import CheckpointError
from icot.models.lm import hidden_size, load_lm_dir, n_layers, save_lm_dir
from icot.rundir import META_FILE

MODULES_FILE = "icot_modules.safetensors"


def save_modules(path: str | Path, modules: Mapping[str, nn.Module]) -> None:
    """Write the state dicts of ``modules`` to ``path/icot_modules.safetensors``.

    Args:
        path: the model directory (created if missing).
        modules: name -> module; tensor keys become ``"{name}.{state-dict key}"``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{name}.{key}": value.detach().contiguous().cpu()  # safetensors needs contiguous, unshared storage
        for name, module in modules.items()
        for key, value in module.state_dict().items()
    }
    save_file(tensors, str(path / MODULES_FILE), metadata={"format": "pt"})


def load_modules(path: str | Path, modules: Mapping[str, nn.Module]) -> None:
    """Load ``path/icot_modules.safetensors`` into ``modules`` (in place), checking every tensor.

    Args:
        path: the model directory.
        modules: name -> module, as given to :func:`save_modules`.

    Raises:
        CheckpointError: naming the file and the tensor when the file is missing or unreadable, a tensor is
            missing or unexpected, or its shape differs from the module's.
    """
    file = Path(path) / MODULES_FILE
    if not file.is_file():
        raise CheckpointError(f"missing {MODULES_FILE}", Path(path))
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"unreadable safetensors file: {e}", file) from None
    expected: set[str] = set()
    for name, module in modules.items():
        state = {}
        for key, param in module.state_dict().items():
            full = f"{name}.{key}"
            expected.add(full)
            if full not in tensors:
                raise CheckpointError(f"missing tensor '{full}'", file)
            if tensors[full].shape != param.shape:
                raise CheckpointError(
                    f"tensor '{full}' has shape {tuple(tensors[full].shape)}, the model expects {tuple(param.shape)}",
                    file)
            state[key] = tensors[full]
        module.load_state_dict(state)
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise CheckpointError(f"unexpected tensor(s) {unexpected}", file)


def save_lm_with_modules(path: str | Path, lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                         modules: Mapping[str, nn.Module], meta: dict[str, Any],
                         config: IcotConfig | None = None) -> None:
    """:func:`~icot.models.lm.save_lm_dir` (``meta["kind"]`` names the kind) plus the extra modules."""
    path = Path(path)
    save_lm_dir(path, lm, tokenizer, meta, config, kind=meta["kind"])
    save_modules(path, modules)


def load_lm_checked(path: str | Path, kind: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Read the LM, tokenizer and ``icot.json`` of a directory written by :func:`save_lm_with_modules`.

    Checks that ``kind`` matches and that ``n_layer`` / ``hidden_size`` in ``icot.json`` fit the LM.

    Returns:
        ``(lm, tokenizer, meta)``.

    Raises:
        CheckpointError: naming ``icot.json`` and the field that does not fit.
    """
    lm, tokenizer, meta = load_lm_dir(path, kind=kind)
    meta_file = Path(path) / META_FILE
    for field, actual in (("n_layer", n_layers(lm)), ("hidden_size", hidden_size(lm))):
        if field not in meta:
            raise CheckpointError(f"missing field '{field}'", meta_file)
        if meta[field] != actual:
            raise CheckpointError(f"field '{field}' is {meta[field]} but the saved LM has {actual}", meta_file)
    return lm, tokenizer, meta


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a module's first parameter (what its inputs are cast to)."""
    return next(module.parameters()).dtype
