"""Work split across processes (``accelerate launch``): validation shards and cross-process sums.

Under ``accelerate launch --num_processes N`` every process holds the whole validation list. Each one
scores only its own shard (:func:`shard`: contiguous blocks whose sizes differ by at most one; a block
may be empty) and :func:`sum_across` adds the per-process counts and sums, so every example counts
exactly once. With one process both are identities and cost nothing.

The helpers read Accelerate's process-wide state (:func:`process_state`), which the training loop's
``Accelerator`` initialises, so a stage's ``validate`` needs no accelerator passed in.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping, Sequence
from typing import TypeVar

import torch
from accelerate.utils import reduce

from icot.devices import process_state

T = TypeVar("T")


def shard(items: Sequence[T]) -> Sequence[T]:
    """This process's contiguous block of ``items`` (all of them with one process)."""
    state = process_state()
    n, size, rank = len(items), state.num_processes, state.process_index
    return items[rank * n // size:(rank + 1) * n // size]


def sum_across(values: Mapping[str, float]) -> dict[str, float]:
    """Every process's ``values`` added key by key (the same keys on every process; a collective call)."""
    keys = sorted(values)
    local = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    return dict(zip(keys, sum_tensor_across(local).tolist()))


def sum_tensor_across(values: torch.Tensor) -> torch.Tensor:
    """Every process's ``values`` (same shape on every process) added elementwise, in float64 on the CPU
    (a collective call): counts stay exact and sums of many per-token losses keep their precision."""
    state = process_state()
    values = values.detach().to(torch.float64)
    if state.num_processes == 1:
        return values.cpu()
    return reduce(values.to(state.device), reduction="sum").cpu()


def mean_across(values: Mapping[str, float]) -> dict[str, float]:
    """Every process's ``values`` averaged key by key (a collective call)."""
    size = process_state().num_processes
    return {k: v / size for k, v in sum_across(values).items()}


def end_process_group(completed: bool) -> None:
    """Tear down the process group that Accelerate formed, if any, before the process exits.

    PyTorch asks programs to destroy the group before they exit: left to interpreter exit, the group and
    the collectives' work objects (which hold tensors) are torn down while Python itself is, and that can abort
    the process. Training objects left in reference cycles, which may hold such work, are collected first. A
    completed command first waits for every process, so process 0 (which hosts the store) stays until all are
    done; a failed one does not wait (the others may never arrive).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    gc.collect()
    if completed:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()
