"""Causal LMs from config or path, and the model-directory format every stage writes.

A model directory holds:
- ``icot.json``: ``{"kind": "lm" | "student" | "emulator" | "implicit", "layout": "explicit" | "nocot", ...}``;
- ``config.yaml``: the resolved run config that produced it;
- the Hugging Face model (``save_pretrained``: ``config.json`` + ``model.safetensors``) and tokenizer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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
from transformers.utils import logging as hf_logging

from icot.config import IcotConfig, ModelConfig, save_config
from icot.errors import CheckpointError
from icot.rundir import META_FILE, read_meta, write_meta
from icot.tokenizer import load_tokenizer


@contextlib.contextmanager
def quiet_hub_bars() -> Iterator[None]:
    """Silence transformers' own bars ("Loading weights", "Writing model shards") for a small model
    directory: one per load or save is noise in every eval, predict and checkpoint."""
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def build_gpt2(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 of the configured shape over ``tokenizer``'s vocabulary."""
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _causal_lm_loss(GPT2LMHeadModel(config))


def _causal_lm_loss(model: PreTrainedModel) -> PreTrainedModel:
    """Name the loss a causal LM trains with: transformers 5 reads ``model.loss_type`` (not the config's)
    and warns at the first forward with labels when it is None."""
    if getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"
    return model


def load_pretrained_lm(path: str | Path, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Any Hugging Face causal LM (hub id or directory), checked against the tokenizer's vocabulary.

    Weights are read from safetensors only (``use_safetensors=True``): a directory holding only
    ``pytorch_model.bin`` is refused rather than unpacked, since that format can run code when loaded.

    Raises:
        CheckpointError: naming the path when the model cannot be read or does not fit the tokenizer.
    """
    try:
        with quiet_hub_bars():
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
    return _causal_lm_loss(model)


def n_layers(model: PreTrainedModel) -> int:
    """Number of decoder blocks (L)."""
    return int(model.config.num_hidden_layers)


def hidden_size(model: PreTrainedModel) -> int:
    """Width of the residual stream (H)."""
    return int(model.config.hidden_size)


# ---------------------------------------------------------------------------------------------
# Model directories


def require_explicit(meta: dict[str, Any], path: str | Path) -> None:
    """Refuse a model that is not an explicit-CoT teacher where one is needed (distillation, ICoT-SI)."""
    if meta.get("layout") != "explicit":
        raise CheckpointError(f"not a teacher: its layout is '{meta.get('layout')}', not 'explicit' (give the "
                              "teacher stage's directory)", path)


def save_lm_dir(path: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, meta: dict[str, Any],
                config: IcotConfig | None = None, kind: str = "lm",
                state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write a causal-LM model directory: the Hugging Face LM and tokenizer, ``icot.json`` (``kind`` and
    ``meta``) and the resolved run config. Teacher, no-CoT and stepwise models are such directories; the
    student's and emulator's add their extra modules (:mod:`icot.models.checkpoint`). ``state_dict``: the
    weights to write instead of ``model``'s own (a sharded model's, gathered whole)."""
    path.mkdir(parents=True, exist_ok=True)
    with quiet_hub_bars():
        model.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(path)
    write_meta(path, {**meta, "kind": kind})
    if config is not None:
        save_config(config, path / "config.yaml")


def load_lm_dir(path: str | Path, dtype: torch.dtype | None = None, kind: str = "lm"
                ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict]:
    """Read back what :func:`save_lm_dir` wrote: ``(model, tokenizer, meta)``.

    Raises:
        CheckpointError: when ``icot.json``'s ``kind`` is not ``kind``, or the model does not load.
    """
    meta = read_meta(path)
    if meta["kind"] != kind:
        raise CheckpointError(f"field 'kind' is '{meta['kind']}', expected '{kind}'", Path(path) / META_FILE)
    tokenizer = load_tokenizer(path)
    model = load_pretrained_lm(path, tokenizer)
    if dtype is not None:
        model = model.to(dtype)
    return model, tokenizer, meta
