"""The one training loop every stage runs on (Accelerate).

A stage says *what* to train (:class:`Stage`: its module, loss, validation and how to save it); this
loop says *how*: AdamW on the parameters that require grad, linear warm-up then a constant rate (as
the papers), gradient clipping and accumulation, periodic validation with keep-best selection, a
progress bar, metrics as JSON lines, seeding, mixed precision and multi-process training through
Accelerate.

A stage directory looks like::

    OUT/icot.json       {"kind": "stage", "stage": ..., "model": "best", "best": {...}}
    OUT/config.yaml     resolved run config
    OUT/metrics.jsonl   one JSON object per log / validation event
    OUT/best/           the best model so far, a model directory (replaced atomically)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from icot.config import IcotConfig, TrainConfig, save_config
from icot.errors import ConfigError
from icot.models.lm import read_meta, save_atomically, write_meta

BEST = "best"


class Stage:
    """One training stage. Subclasses set ``name``, ``module`` and ``train_items`` and implement the rest.

    ``module`` holds every parameter the stage touches; frozen ones (a teacher) have
    ``requires_grad=False`` and are never given to the optimizer.
    """

    name: str = "stage"
    module: nn.Module
    train_items: Sequence[Any]

    def collate(self, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Turn a list of training items into a batch of tensors."""
        raise NotImplementedError

    def loss(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss of one batch, and extra scalars to log."""
        raise NotImplementedError

    def validate(self, module: nn.Module) -> dict[str, float]:
        """Validation metrics; must contain ``accuracy`` (exact match) and ``loss``.

        A stage whose model is not yet of the kind it must deliver (stepwise internalization before all
        CoT tokens are removed) adds ``"eligible": False`` so that keep-best passes it over.
        """
        raise NotImplementedError

    def begin_step(self, step: int) -> bool:
        """Called before optimizer step ``step`` (0-based) is accumulated; True resets the optimizer state."""
        return False

    def save(self, module: nn.Module, path: Path) -> None:
        """Write ``module`` as a model directory at ``path``."""
        raise NotImplementedError


def _score(metrics: dict[str, float]) -> tuple[float, float]:
    # Higher exact match wins; lower validation loss breaks ties (long stretches at 0% are common).
    return metrics["accuracy"], -metrics["loss"]


def _lr_lambda(warmup_steps: int):
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def stage_is_done(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` holds a finished stage."""
    try:
        meta = read_meta(out_dir)
    except Exception:
        return False
    return meta.get("kind") == "stage" and meta.get("status") == "done"


def model_path(stage_dir: str | Path) -> Path:
    """The model directory inside a stage directory (the stage's best checkpoint)."""
    meta = read_meta(stage_dir)
    return Path(stage_dir) / meta["model"] if meta["kind"] == "stage" else Path(stage_dir)


class _Logger:
    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def __call__(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def train_stage(stage: Stage, cfg: TrainConfig, out_dir: str | Path, run_config: IcotConfig,
                progress: bool = True) -> dict[str, Any]:
    """Train ``stage`` with ``cfg`` and keep its best validated model in ``out_dir/best``.

    Returns:
        ``{"steps", "examples", "seconds", "best": metrics of the kept model}``.
    """
    out_dir = Path(out_dir)
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=cfg.mixed_precision)
    main = accelerator.is_main_process
    set_seed(cfg.seed)
    micro, rest = divmod(cfg.batch_size, cfg.grad_accum * accelerator.num_processes)
    if rest or micro == 0:
        raise ConfigError(f"field '{stage.name}.batch_size': {cfg.batch_size} is not divisible by grad_accum x processes "
                         f"= {cfg.grad_accum * accelerator.num_processes}")
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        # Until this run finishes the directory must not look done, even if an earlier run finished there.
        write_meta(out_dir, {"kind": "stage", "stage": stage.name, "model": BEST, "status": "running"})
        save_config(run_config, out_dir / "config.yaml")
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    log = _Logger(out_dir / "metrics.jsonl", main)

    module = stage.module
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.warmup_steps))
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(list(stage.train_items), batch_size=micro, shuffle=True, drop_last=True,
                        collate_fn=stage.collate, generator=generator)
    if len(loader) < cfg.grad_accum:
        raise ConfigError(f"field '{stage.name}.batch_size': {len(stage.train_items)} training examples are "
                          f"fewer than one batch of {cfg.batch_size}")
    module, optimizer, loader, scheduler = accelerator.prepare(module, optimizer, loader, scheduler)

    steps_per_epoch = len(loader) // cfg.grad_accum
    total_steps = math.ceil(cfg.epochs * steps_per_epoch)
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    deadline = time.monotonic() + cfg.max_minutes * 60 if cfg.max_minutes else math.inf

    best: dict[str, float] | None = None
    step, examples, micro_steps = 0, 0, 0
    running: list[float] = []
    start = time.monotonic()
    bar = tqdm(total=total_steps, desc=stage.name, disable=not (progress and main), dynamic_ncols=True)

    def validate_and_keep() -> None:
        nonlocal best
        unwrapped = accelerator.unwrap_model(module)
        unwrapped.eval()
        with torch.no_grad():
            metrics = stage.validate(unwrapped)
        unwrapped.train()
        eligible = bool(metrics.get("eligible", True))
        improved = eligible and (best is None or _score(metrics) > _score(best))
        if improved:
            best = {**metrics, "step": step}
            if main:
                save_atomically(out_dir / BEST, lambda tmp: stage.save(unwrapped, tmp))
        log({"event": "validate", "step": step, "examples": examples, "seconds": time.monotonic() - start,
             "improved": improved, **{f"val_{k}": v for k, v in metrics.items()}})
        bar.set_postfix(acc=f"{metrics['accuracy']:.3f}", val_loss=f"{metrics['loss']:.3f}")
        accelerator.wait_for_everyone()

    module.train()
    done = step >= total_steps
    while not done:
        for batch in loader:
            if micro_steps % cfg.grad_accum == 0 and stage.begin_step(step):
                # A new curriculum stage: Adam's moments describe the old task, start them afresh.
                optimizer.state.clear()
                log({"event": "optimizer_reset", "step": step})
            with accelerator.accumulate(module):
                with accelerator.autocast():
                    loss, extra = stage.loss(module, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            micro_steps += 1
            running.append(loss.detach().float().item())
            if not accelerator.sync_gradients:
                continue
            step += 1
            examples += cfg.batch_size
            bar.update(1)
            if step % cfg.log_every == 0:
                log({"event": "train", "step": step, "examples": examples, "seconds": time.monotonic() - start,
                     "loss": sum(running) / len(running), "lr": scheduler.get_last_lr()[0], **extra})
                bar.set_description(f"{stage.name} loss {sum(running) / len(running):.4f}")
                running.clear()
            out_of_time = time.monotonic() > deadline
            if step >= total_steps or out_of_time:
                done = True
                break
            if cfg.eval_every and step % cfg.eval_every == 0:
                validate_and_keep()
    validate_and_keep()
    bar.close()
    if best is None:
        raise RuntimeError(f"{stage.name}: no validation was eligible for keeping; train longer")
    seconds = time.monotonic() - start
    result = {"steps": step, "examples": examples, "seconds": seconds, "best": best}
    if main:
        write_meta(out_dir, {"kind": "stage", "stage": stage.name, "model": BEST, "status": "done", **result})
    accelerator.wait_for_everyone()
    return result
