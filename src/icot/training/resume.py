"""Exact-resume checkpoints of the training loop, in safetensors and JSON only.

``OUT/checkpoint/`` is replaced atomically (written to a temporary directory, then renamed), so a run
killed while saving keeps the previous checkpoint. It holds::

    model.safetensors      the stage module's state (tied tensors stored once)
    optimizer.safetensors  the optimizer's tensors, "state.{param index}.{name}"
    rng.safetensors        every process's RNG states ("{source}" -> (processes, ...)) and the data
                           order generator's state at the start of the current epoch
    trainer_state.json     position (step, epoch, micro-batches consumed), counters, best metrics,
                           elapsed time, metrics.jsonl length, optimizer param groups, scheduler,
                           gradient scaler, and what must not change on resume (``MUST_MATCH``: batch,
                           seed, processes, the training data's SHA-256; ``settings``: the config and
                           input directories, see ``icot.training.loop.setting_changes``)

Under FSDP (:mod:`icot.training.sharding`) the model and optimizer tensors are gathered whole to the main
process before they are written, and given back to each process as its shard on resume: the files are the
same as those of an unsharded run.

Nothing here executes code from a file: tensors come from safetensors, everything else from JSON.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from icot.errors import CheckpointError
from icot.rundir import CHECKPOINT, STATE_FILE, save_atomically
from icot.training.sharding import full_optimizer_state, full_state, is_sharded, load_optimizer_state

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
FORMAT = 2  # 2: trainer_state.json holds "settings" and "train_sha256"
# Fields a resumed run must share with the checkpoint: they fix the data order and what one step is.
MUST_MATCH = ("stage", "num_processes", "batch_size", "grad_accum", "seed", "train_examples", "train_sha256")


# ---------------------------------------------------------------------------------------------
# RNG states: each process's, gathered to the main process as tensors


def _local_rng() -> dict[str, torch.Tensor]:
    version, internal, gauss = random.getstate()
    if version != 3:
        raise RuntimeError(f"unsupported Python random state version {version}")
    _, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(internal, dtype=torch.int64),
        "python_gauss": torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64),
        "numpy": torch.tensor([*keys.tolist(), pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([cached], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()  # this process's device
    return states


def _set_local_rng(states: Mapping[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    has_gauss, gauss = states["python_gauss"].tolist()
    random.setstate((3, tuple(states["python"].tolist()), gauss if has_gauss else None))
    numpy = states["numpy"].tolist()
    np.random.set_state(("MT19937", np.array(numpy[:-2], dtype=np.uint32), numpy[-2], numpy[-1],
                         float(states["numpy_gauss"][0])))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _gathered_rng(accelerator: Accelerator) -> dict[str, torch.Tensor]:
    """Every process's RNG states, ``name -> (processes, ...)`` (a collective call)."""
    local = _local_rng()
    if accelerator.num_processes == 1:
        return {k: v[None] for k, v in local.items()}
    return {k: accelerator.gather(v[None].to(accelerator.device)).cpu() for k, v in local.items()}


# ---------------------------------------------------------------------------------------------
# Optimizer: tensors into safetensors, the rest into JSON


def _optimizer_parts(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` as safetensors tensors and JSON-able rest."""
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            name = f"state.{index}.{key}"
            if torch.is_tensor(value):
                tensors[name] = value.detach().cpu().contiguous()
            else:
                scalars[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# ---------------------------------------------------------------------------------------------
# Saving and loading


def save_checkpoint(out_dir: Path, accelerator: Accelerator, module: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, trainer_state: dict[str, Any], data_epoch_start: torch.Tensor) -> Path:
    """Write ``out_dir/checkpoint`` atomically (main process only; every process must call it).

    Args:
        out_dir: the stage directory.
        accelerator: the run's accelerator.
        module: the unwrapped stage module (sharded under FSDP: gathered whole here).
        optimizer, scheduler: the run's optimizer and LR scheduler.
        trainer_state: JSON-able position, counters and metrics (see the module docstring).
        data_epoch_start: the data order generator's state at the start of the current epoch.
    """
    rng = _gathered_rng(accelerator)
    sharded = is_sharded(module)
    if sharded:  # collectives: every process gathers, the main process receives
        model_state, optimizer_state = full_state(module), full_optimizer_state(module, optimizer)
    if accelerator.is_main_process:
        if not sharded:
            model_state, optimizer_state = module.state_dict(), optimizer.state_dict()
        tensors, optimizer_meta = _optimizer_parts(optimizer_state)
        state = {"format": FORMAT, **trainer_state, "optimizer": optimizer_meta,
                 "scheduler": scheduler.state_dict(),
                 "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None}

        def write(tmp: Path) -> None:
            save_file(_state_tensors(model_state), str(tmp / MODEL_FILE))
            save_file(tensors, str(tmp / OPTIMIZER_FILE))
            save_file({**rng, "data_epoch_start": data_epoch_start.cpu()}, str(tmp / RNG_FILE))
            # Written last: a checkpoint directory is complete when its trainer_state.json exists.
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")

        save_atomically(out_dir / CHECKPOINT, write)
    accelerator.wait_for_everyone()
    return out_dir / CHECKPOINT


def read_trainer_state(path: Path, expected: Mapping[str, Any]) -> dict[str, Any]:
    """``trainer_state.json`` of checkpoint ``path``, checked against what this run must share with it.

    Raises:
        CheckpointError: naming the file and the field that is unreadable or does not match.
    """
    file = path / STATE_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"unreadable trainer state: {e}", file) from None
    if not isinstance(state, dict) or not isinstance(state.get("format"), int):
        raise CheckpointError("field 'format' is missing: not a trainer state", file)
    if state["format"] != FORMAT:
        raise CheckpointError(f"field 'format' is {state['format']}, this icot reads {FORMAT}: the checkpoint was "
                              "written by another version; train afresh", file)
    for field in ("position", "optimizer", "scheduler", "settings"):
        if not isinstance(state.get(field), dict):
            raise CheckpointError(f"field '{field}' is missing or not a mapping", file)
    for field in MUST_MATCH:
        if field == "train_sha256" and state.get(field) != expected[field]:
            raise CheckpointError("the training data differ from those this checkpoint was trained on (field "
                                  f"'train_sha256' is {str(state.get(field))[:12]}..., this run's data give "
                                  f"{expected[field][:12]}...): resume on the same file, or train afresh", file)
        if state.get(field) != expected[field]:
            raise CheckpointError(f"field '{field}' is {state.get(field)!r} but this run has {expected[field]!r}; "
                                  "resume with the same settings, or delete the checkpoint to start afresh", file)
    return state


def _tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"unreadable safetensors file: {e}", file) from None


def _tied_groups(state: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """The state dict's names grouped by the tensor they name: tied weights (GPT-2's ``lm_head`` and
    ``wte``) share a group; views of one buffer at different places (cuDNN packs an LSTM's weights into
    one flat buffer) do not."""
    groups: dict[tuple, list[str]] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def _state_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ``model.safetensors`` holds of a state dict: each tensor once (tied ones under one name), as its own
    CPU copy (safetensors writes whole storages, which views into a shared buffer are not)."""
    return {names[0]: state[names[0]].detach().to("cpu", copy=True).contiguous() for names in _tied_groups(state)}


COMPILED_PREFIX = "_orig_mod."  # torch.compile's OptimizedModule holds the module as _orig_mod


def load_module_state(path: Path, module: nn.Module) -> None:
    """Load ``model.safetensors`` of checkpoint ``path`` into ``module`` (in place).

    Raises:
        CheckpointError: naming the file and the first tensor that is missing, unexpected or of another shape.
    """
    file = path / MODEL_FILE
    # Checkpoints of compiled runs written before the loop unwrapped torch.compile name tensors '_orig_mod.X'.
    tensors = {name.removeprefix(COMPILED_PREFIX): t for name, t in _tensors(file).items()}
    for names in _tied_groups(module.state_dict()):  # a tied group is stored under one of its names
        stored = next((n for n in names if n in tensors), None)
        if stored is not None:
            for name in names:
                tensors.setdefault(name, tensors[stored])
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        details = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        raise CheckpointError(f"does not fit this stage's model: {details[0] if details else e}", file) from None


def load_training_state(path: Path, state: Mapping[str, Any], accelerator: Accelerator,
                        optimizer: torch.optim.Optimizer, scheduler: Any, module: nn.Module | None = None
                        ) -> torch.Tensor:
    """Restore optimizer, scheduler, gradient scaler and this process's RNG states from checkpoint ``path``.

    ``module`` is the prepared stage module: when it is sharded (FSDP), the main process reads the optimizer
    file and every process receives its shard (a collective).

    Returns:
        The data order generator's state at the start of the checkpoint's epoch.

    Raises:
        CheckpointError: naming the file and the field that does not fit.
    """
    try:
        if module is not None and is_sharded(module):
            whole, failure = None, None
            if accelerator.is_main_process:
                try:
                    whole = _optimizer_state(_tensors(path / OPTIMIZER_FILE), state["optimizer"])
                except (CheckpointError, KeyError, ValueError, TypeError) as e:
                    failure = e
            # The other processes would wait for the main one's shards forever: all stop together.
            if accelerator.reduce(torch.tensor([int(failure is not None)], device=accelerator.device),
                                  reduction="sum").item():
                raise failure or CheckpointError("the main process could not read it (its error names the field)",
                                                 path / OPTIMIZER_FILE)
            load_optimizer_state(module, optimizer, whole)
        else:
            optimizer.load_state_dict(_optimizer_state(_tensors(path / OPTIMIZER_FILE), state["optimizer"]))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"field 'optimizer' does not fit this stage's parameters: {e}", path / STATE_FILE) from None
    scheduler.load_state_dict(dict(state["scheduler"]))
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    rng = _tensors(path / RNG_FILE)
    try:
        # clone(): torch's set_rng_state misreads a row view with a storage offset (it crashed on rank 1).
        _set_local_rng({k: v[accelerator.process_index].clone() for k, v in rng.items() if k != "data_epoch_start"})
        return rng["data_epoch_start"].clone()
    except (KeyError, IndexError, RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"RNG states do not fit: {type(e).__name__}: {e}", path / RNG_FILE) from None
