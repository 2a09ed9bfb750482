"""Whole weights from a sharded module: FSDP2 (``accelerate launch`` with ``distributed_type: FSDP`` and
``fsdp_version: 2``).

Under FSDP every process holds one shard of each parameter, gradient and optimizer state. The training
loop still validates, decodes and saves whole modules, through these helpers (each one a no-op or the
plain call on a module that is not sharded):

- :func:`gathered`: for the duration of a block, every FSDP unit is all-gathered once and kept whole, so
  that each process runs as many forward passes as its own validation shard and its own decoding need
  (greedy decoding stops at ``<eos>`` on each process's schedule; a sharded forward pass is a collective
  that every process would have to join). The cost is one whole copy of the weights per process for the
  block, as under DDP, without optimizer state.
- :func:`full_state`: the module's whole weights, on the main process (for ``save_pretrained`` and
  checkpoints).
- :func:`full_optimizer_state` / :func:`load_optimizer_state`: the optimizer state in the form
  ``optimizer.state_dict()`` has on one process (``{"state": {index: {...}}, "param_groups": [...]}``, whole
  tensors), and back into shards; a checkpoint holds the same files whether the run sharded or not.

The gathers use ``torch.distributed.checkpoint.state_dict`` (full state dicts, offloaded to the CPU of
the main process) and are collectives: every process must call them, in the same order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule

# Whole tensors, on the CPU of rank 0 (the main process); the other processes get {}.
_TO_MAIN = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Whole tensors given on rank 0 only, each process keeping its shard.
_FROM_MAIN = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` (or a submodule) is an FSDP2 unit."""
    return any(isinstance(m, FSDPModule) for m in module.modules())


def _units(module: nn.Module) -> list[FSDPModule]:
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def _reshards_after_forward(unit: FSDPModule) -> bool:
    # FSDP2 has a public setter but no getter for this setting: read the property it sets.
    return all(group._reshard_after_forward for group in unit._get_fsdp_state()._fsdp_param_groups)


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Keep every parameter of ``module`` whole for the block (a collective on entry and exit); each
    process may then run any number of forward passes alone. Nothing is done for an unsharded module."""
    units = _units(module)
    settings = [_reshards_after_forward(unit) for unit in units]
    for unit in units:  # the same order on every process: the all-gathers pair up
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit, reshard in zip(units, settings):
            unit.set_reshard_after_forward(reshard, recurse=False)
            unit.reshard()


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole weights of a sharded ``module`` on the main process (CPU), ``{}`` on the others."""
    return get_model_state_dict(module, options=_TO_MAIN)


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the torch optimizer


def _parameter_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters, in its order (the indices of ``optimizer.state_dict()``)."""
    names = {p: n for n, p in module.named_parameters()}
    return [names[p] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` of a sharded ``module``'s optimizer with whole tensors, on the main process
    (CPU); ``{}`` on the others."""
    whole = get_optimizer_state_dict(module, _inner(optimizer), options=_TO_MAIN)
    if "state" not in whole:
        return {}
    index = {name: i for i, name in enumerate(_parameter_names(module, optimizer))}
    return {"state": {index[name]: entry for name, entry in whole["state"].items()},
            "param_groups": optimizer.state_dict()["param_groups"]}


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any] | None) -> None:
    """Give each process its shard of ``state`` (what :func:`full_optimizer_state` returned; read on the main
    process, ``None`` on the others)."""
    names = _parameter_names(module, optimizer)
    whole: dict[str, Any] = {}
    if state is not None:
        whole = {"state": {names[int(i)]: entry for i, entry in state["state"].items()},
                 "param_groups": [{**group, "params": [names[int(i)] for i in group["params"]]}
                                  for group in state["param_groups"]]}
    set_optimizer_state_dict(module, _inner(optimizer), whole, options=_FROM_MAIN)
