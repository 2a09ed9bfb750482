"""Causal LMs from config or path, and the model-directory format every stage writes.

A model directory holds:
- ``icot.json``: ``{"kind": "lm" | "student" | "emulator" | "implicit", "layout": "explicit" | "nocot", ...}``;
- ``config.yaml``: the resolved run config that produced it;
- the Hugging Face model (``save_pretrained``: ``config.json`` + ``model.safetensors``) and tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from icot.config import IcotConfig, ModelConfig, save_config
from icot.errors import CheckpointError

META_FILE = "icot.json"


def build_gpt2(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 of the configured shape over ``tokenizer``'s vocabulary."""
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, loss_type="ForCausalLM",
    )
    return GPT2LMHeadModel(config)


def load_pretrained_lm(path: str | Path, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Any Hugging Face causal LM (hub id or directory), checked against the tokenizer's vocabulary.

    Weights are read from safetensors only (``use_safetensors=True``): a directory holding only
    ``pytorch_model.bin`` is refused rather than unpacked, since that format can run code when loaded.

    Raises:
        CheckpointError: naming the path when the model cannot be read or does not fit the tokenizer.
    """
    try:
        model, report = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True,
                                                             output_loading_info=True)
    except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: a truncated or garbled file
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise CheckpointError(f"cannot load the model: {type(e).__name__}: {first}", path) from None
    except RuntimeError:  # transformers has printed its load report: which tensor, which shapes
        raise CheckpointError("cannot load the model: a tensor of model.safetensors does not fit config.json "
                              "(see the load report above)", path) from None
    # transformers initialises weights the file lacks at random and only prints a report: a model that is
    # partly random must not answer (unexpected extra tensors, e.g. old buffers, are harmless).
    bad = sorted(report["missing_keys"]) + sorted(report["mismatched_keys"])
    if bad:
        raise CheckpointError(f"cannot load the model: config.json does not match model.safetensors ({len(bad)} "
                              f"tensors missing or of another shape, e.g. {bad[0]})", path)
    n_vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_vocab:
        raise CheckpointError(
            f"tokenizer has {len(tokenizer)} tokens but the model's embedding has {n_vocab} (field vocab_size)", path)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def n_layers(model: PreTrainedModel) -> int:
    """Number of decoder blocks (L)."""
    return int(model.config.num_hidden_layers)


def hidden_size(model: PreTrainedModel) -> int:
    """Width of the residual stream (H)."""
    return int(model.config.hidden_size)


def context_length(model: PreTrainedModel) -> int | None:
    """Longest sequence the model's positions allow (None when not bounded by config)."""
    cfg = model.config
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            return value
    return None


# ---------------------------------------------------------------------------------------------
# Model directories


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ``icot.json`` of a model directory."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"not an icot model directory (no {META_FILE})", path)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"invalid JSON: {e}", meta_path) from None
    if not isinstance(meta, dict) or "kind" not in meta:
        raise CheckpointError("missing field 'kind'", meta_path)
    return meta


def require_explicit(meta: dict[str, Any], path: str | Path) -> None:
    """Refuse a model that is not an explicit-CoT teacher where one is needed (distillation, ICoT-SI)."""
    if meta.get("layout") != "explicit":
        raise CheckpointError(f"not a teacher: its layout is '{meta.get('layout')}', not 'explicit' (give the "
                              "teacher stage's directory)", path)


def write_meta(path: str | Path, meta: dict[str, Any]) -> None:
    """Write ``icot.json``."""
    Path(path, META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_atomically(out_dir: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_dir)`` and then move ``tmp_dir`` onto ``out_dir``.

    A process killed while writing leaves the previous ``out_dir`` intact (the rename is the commit).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write(tmp)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def recover_atomically(out_dir: str | Path) -> None:
    """Repair what a process killed inside :func:`save_atomically` left beside ``out_dir``.

    Killed between its two renames, only the previous directory exists, moved aside as
    ``.NAME.old-PID``: it is put back. Leftover temporary and aside directories are deleted.
    """
    out_dir = Path(out_dir)
    aside = sorted(out_dir.parent.glob(f".{out_dir.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if aside and not out_dir.exists():
        os.replace(aside.pop(), out_dir)
    for path in [*aside, *out_dir.parent.glob(f".{out_dir.name}.tmp-*")]:
        shutil.rmtree(path, ignore_errors=True)


def save_lm_dir(path: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, meta: dict[str, Any],
                config: IcotConfig | None = None) -> None:
    """Write a plain causal-LM directory (teacher, no-CoT model, stepwise model)."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    write_meta(path, {"kind": "lm", **meta})
    if config is not None:
        save_config(config, path / "config.yaml")


def load_lm_dir(path: str | Path, dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict]:
    """Read back what :func:`save_lm_dir` wrote: ``(model, tokenizer, meta)``."""
    from icot.tokenizer import load_tokenizer

    meta = read_meta(path)
    if meta["kind"] != "lm":
        raise CheckpointError(f"field 'kind' is '{meta['kind']}', expected 'lm'", Path(path) / META_FILE)
    tokenizer = load_tokenizer(path)
    model = load_pretrained_lm(path, tokenizer)
    if dtype is not None:
        model = model.to(dtype)
    return model, tokenizer, meta
