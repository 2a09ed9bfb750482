"""The one training loop every stage runs on (Accelerate).

A stage says *what* to train (:class:`Stage`: its module, loss, validation and how to save it); this
loop says *how*: AdamW on the parameters that require grad, linear warm-up then a constant rate (as
the papers), gradient clipping and accumulation, periodic validation with keep-best selection, a
progress bar, metrics as JSON lines, seeding, mixed precision, exact-resume checkpoints, a clean stop
on SIGINT/SIGTERM, and multi-process training through Accelerate.

A stage directory looks like::

    OUT/icot.json       {"kind": "stage", "stage": ..., "model": "best", "status": "running" | "done", ...}
    OUT/config.yaml     resolved run config
    OUT/metrics.jsonl   one JSON object per log / validation event
    OUT/best/           the best model so far, a model directory (replaced atomically)
    OUT/checkpoint/     exact-resume state (:mod:`icot.training.resume`), every ``save_every`` steps and
                        on SIGINT/SIGTERM; removed when the stage finishes

Under ``accelerate launch --num_processes N`` (DDP) the global batch stays ``batch_size``: each process
takes ``batch_size / (N x grad_accum)`` examples per micro-batch. Only the main process writes; validation
is sharded across processes (:mod:`icot.training.distributed`); all processes agree at every step on
whether to stop, so they save and stop together. Stages that train one plain causal LM (``Stage.shardable``)
also run under Accelerate's FSDP2, which shards weights, gradients and optimizer state across processes:
the loop validates with the weights gathered whole and saves them gathered on the main process
(:mod:`icot.training.sharding`), so model directories and checkpoints are those of an unsharded run.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    TorchDynamoPlugin,
    is_mlflow_available,
    is_tensorboard_available,
    is_wandb_available,
    set_seed,
)
from torch import nn
from torch.utils.data import DataLoader

from icot.config import IcotConfig, TrainConfig, output_settings, save_config
from icot.devices import process_state, resolve_mixed_precision
from icot.errors import CheckpointError, ConfigError, TrainingInterrupted
from icot.progress import progress_bar
from icot.rundir import (
    BEST,
    CHECKPOINT,
    STATE_FILE,
    checkpoint_dir,
    recover_atomically,
    remove_checkpoints,
    save_atomically,
    write_meta,
)
from icot.training.distributed import mean_across
from icot.training.resume import load_module_state, load_training_state, read_trainer_state, save_checkpoint
from icot.training.sharding import full_state, gathered, is_sharded
from icot.training.signals import StopSignals

# A resumed run may change these fields of its own section: how long it trains, how often it validates,
# the shape of its learning-rate decay from the resumed step on (annealing a run that has plateaued; a new
# max_steps already moves a decay's end), its mixed precision (a run moved to a machine without native bf16) and
# whether its forward is compiled (the same computation, faster after a compilation), not its peak rate, batch
# or data. The neutral fields
# (config.NEUTRAL_FIELDS: logging, saving, trackers) may change anywhere; any other change in the sections
# the stage depends on, or in the stage directories it reads, is refused.
RESUMABLE = ("epochs", "max_steps", "max_minutes", "patience", "keep_best_by", "eval_every", "eval_examples",
             "eval_batch_size", "lr_schedule", "min_lr_ratio", "mixed_precision", "compile")


class Stage:
    """One training stage. Subclasses set ``name``, ``module`` and ``train_items`` and implement the rest.

    ``module`` holds every parameter the stage touches; frozen ones (a teacher) have
    ``requires_grad=False`` and are never given to the optimizer. A module that computes trainable
    parameters no loss reads (the emulator runs its LM's last block, whose output nothing uses) sets
    ``unused_parameters = True``, so that DDP does not wait for their gradients. A stage whose module is one
    Hugging Face causal LM, called only through its forward, sets ``shardable = True``: it may run under FSDP,
    and its ``save`` then receives the whole weights as ``state_dict``.

    For exact resume, randomness in ``collate`` and ``loss`` must come from the global torch RNG (saved
    in checkpoints) or from generators seeded by the step (as the stepwise stage does).
    """

    name: str = "stage"
    module: nn.Module
    train_items: Sequence[Any]
    unused_parameters: bool = False
    shardable: bool = False

    def collate(self, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Turn a list of training items into a batch of tensors."""
        raise NotImplementedError

    def loss(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """The training loss of one batch, and extra scalars to log: floats or 0-d tensors, which the loop reads
        back only when it logs (an ``.item()`` here would make the host wait for the device every step)."""
        raise NotImplementedError

    def validate(self, module: nn.Module) -> dict[str, float]:
        """Validation metrics; must contain ``accuracy`` (exact match) and ``loss``.

        A stage whose model is not yet of the kind it must deliver (stepwise internalization before all
        CoT tokens are removed) adds ``"eligible": False`` so that keep-best passes it over. Under several
        processes every process calls it: score ``icot.training.distributed.shard`` of the examples and
        add the counts with ``sum_across``, so that each example counts once.
        """
        raise NotImplementedError

    def begin_step(self, step: int) -> bool:
        """Called before optimizer step ``step`` (0-based) is accumulated; True resets the optimizer state.

        A resumed run first replays the calls for the steps already done (results ignored), so that a
        curriculum's state is rebuilt: keep it cheap and deterministic.
        """
        return False

    def after_validation(self, step: int, metrics: dict[str, float]) -> None:
        """Called with the metrics of the validation after ``step`` optimizer steps, on every process alike,
        before the next step begins: a curriculum that follows the model's progress acts here and keeps what
        it decides in :meth:`decisions`."""

    def decisions(self) -> dict[str, Any]:
        """JSON-able state of the stage that :meth:`begin_step` replays cannot rebuild (decisions taken in
        :meth:`after_validation`); saved in checkpoints and handed to :meth:`restore_decisions` on resume."""
        return {}

    def restore_decisions(self, state: dict[str, Any]) -> None:
        """Restore :meth:`decisions` from a checkpoint, before the replay of :meth:`begin_step`."""

    def check_budget(self) -> None:
        """Refuse (ConfigError), before the run touches its directory, a budget too short for anything to be
        kept; called after :meth:`restore_decisions` on resume, so decisions already taken count."""

    def lr_scale(self, step: int) -> float:
        """A stage's own factor on the learning rate at optimizer step ``step`` (a pure function of the
        step, so resume needs no state); 1 by default."""
        return 1.0

    def save(self, module: nn.Module, path: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write ``module`` as a model directory at ``path``; under FSDP (shardable stages only) ``module`` is
        sharded and ``state_dict`` holds its whole weights."""
        raise NotImplementedError


def _score(metrics: dict[str, float], keep_best_by: str) -> tuple[float, ...]:
    """Keep-best's rank of a validation (higher is better), by ``TrainConfig.keep_best_by``."""
    if keep_best_by == "loss":
        return (-metrics["loss"],)
    # Higher exact match wins; lower validation loss breaks ties (long stretches at 0% are common).
    return metrics["accuracy"], -metrics["loss"]


def lr_factor(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """The learning rate at optimizer step ``step`` as a fraction of ``cfg.lr``: linear warm-up, then
    ``cfg.lr_schedule`` (constant, or linear/cosine decay reaching ``cfg.min_lr_ratio`` at ``total_steps``)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    decay = 1.0 - progress if cfg.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


class _Logger:
    """Appends JSON lines to metrics.jsonl (main process only) and counts them for checkpoints; with a
    ``tracker`` (an Accelerator whose ``log_with`` is set) also sends each record's numbers to it, as
    ``EVENT/NAME`` at the record's step."""

    def __init__(self, path: Path, enabled: bool, tracker: Accelerator | None = None):
        self.path, self.enabled, self.lines, self.tracker = path, enabled, 0, tracker

    def __call__(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            self.lines += 1
        if self.tracker is not None:  # Accelerator.log writes on the main process only
            numbers = {f"{record['event']}/{k}": v for k, v in record.items()
                       if k not in ("event", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
            if numbers:
                self.tracker.log(numbers, step=record["step"])

    def truncate(self, lines: int) -> None:
        """Keep the first ``lines`` records: what a killed run wrote after its checkpoint is written again."""
        if self.enabled:
            kept = self.path.read_text(encoding="utf-8").splitlines(keepends=True)[:lines] if self.path.is_file() else []
            self.path.write_text("".join(kept), encoding="utf-8")
            self.lines = len(kept)


@dataclass
class _Position:
    """Where a run stands: saved in checkpoints (``trainer_state.json``), restored on resume.

    ``batches_in_epoch`` counts this process's micro-batches of the current epoch; ``running`` holds the
    losses of the micro-batches since the last train log (between logs and saves the newest wait on the device in
    ``_Trainer.pending``); ``metrics_lines`` is the length of metrics.jsonl;
    ``stale`` counts the eligible validations in a row that did not improve the kept model.
    """

    step: int = 0
    examples: int = 0
    micro_steps: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    best: dict[str, float] | None = None
    running: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    metrics_lines: int = 0
    stale: int = 0


# Accelerate setups that shard the model and that icot does not run: the loop saves, validates and decodes
# whole modules, which it gathers under FSDP2 (icot.training.sharding) only.
SHARDED = {DistributedType.DEEPSPEED: "DeepSpeed", DistributedType.MEGATRON_LM: "Megatron-LM"}


def _accelerator(stage: Stage, cfg: TrainConfig, out_dir: Path) -> Accelerator:
    # Dynamic shapes: stepwise batches narrow as the CoT goes, and should not recompile at each width.
    dynamo = TorchDynamoPlugin(backend="inductor", dynamic=True) if cfg.compile else TorchDynamoPlugin()
    # Accelerate keeps one mixed precision and one dynamo setting per process (the first Accelerator's),
    # but the stages of one pipeline may each set their own: forget the last stage's (the process group
    # and device stay). Accelerate has no public call for this; transformers' TrainingArguments uses the
    # same private one.
    shared = AcceleratorState._shared_state
    last_dynamo = getattr(shared.get("dynamo_plugin"), "backend", dynamo.backend)
    precision, note = resolve_mixed_precision(cfg.mixed_precision, process_state().device)
    if note and process_state().is_main_process:
        print(f"[icot] {stage.name}: {note}", file=sys.stderr)
    if shared.get("_mixed_precision", precision) != precision or last_dynamo != dynamo.backend:
        AcceleratorState._reset_state()
    ddp = DistributedDataParallelKwargs(find_unused_parameters=stage.unused_parameters)
    if cfg.log_with and not _tracker_available(cfg.log_with):
        raise ConfigError(f"field '{stage.name}.log_with': {cfg.log_with} is not installed (pip install {cfg.log_with})")
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=precision,
                              kwargs_handlers=[ddp], dynamo_plugin=dynamo, log_with=cfg.log_with or None,
                              project_dir=str(out_dir / "tracking") if cfg.log_with else None)
    if accelerator.distributed_type in SHARDED:
        raise ConfigError(f"field 'distributed_type' of the accelerate config is "
                          f"{SHARDED[accelerator.distributed_type]}: icot trains with DDP or FSDP only; use "
                          "'accelerate launch --multi_gpu', or an FSDP config (fsdp_version: 2) for teacher, nocot "
                          "and stepwise")
    if accelerator.distributed_type == DistributedType.FSDP:
        _check_fsdp(stage, accelerator)
    return accelerator


def _check_fsdp(stage: Stage, accelerator: Accelerator) -> None:
    if not stage.shardable:
        raise ConfigError(f"field 'distributed_type' of the accelerate config is FSDP, which stage '{stage.name}' "
                          "does not support (it reads and writes hidden states of whole modules through hooks, "
                          "beside extra modules); only teacher, nocot and stepwise shard: train "
                          f"{stage.name} with 'accelerate launch --multi_gpu' (DDP)")
    version = accelerator.state.fsdp_plugin.fsdp_version
    if version != 2:
        raise ConfigError(f"field 'fsdp_config.fsdp_version' of the accelerate config is {version}: icot shards "
                          "with FSDP2 only; set fsdp_version: 2")


def _tracker_available(name: str) -> bool:
    return {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available,
            "mlflow": is_mlflow_available}[name]()


def _micro_batch(stage: Stage, cfg: TrainConfig, processes: int) -> int:
    micro, rest = divmod(cfg.batch_size, cfg.grad_accum * processes)
    if rest or micro == 0:
        raise ConfigError(f"field '{stage.name}.batch_size': {cfg.batch_size} is not divisible by grad_accum x processes "
                          f"= {cfg.grad_accum * processes}")
    return micro


def train_fingerprint(items: Sequence[Any]) -> str:
    """SHA-256 of the training items (token ids and offsets): a resumed run must train on the same data,
    and a file of the same length but other lines is other data."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(repr(item).encode())
    return digest.hexdigest()


def run_settings(run_config: IcotConfig, depends: Sequence[str], reads: Mapping[str, str]) -> dict[str, Any]:
    """What makes a checkpoint this run's: the output settings of the sections the stage depends on
    (:func:`icot.config.output_settings`) and the stage directories it reads, as absolute paths."""
    return {**output_settings(run_config, depends),
            **{f"reads.{name}": str(Path(path).resolve()) for name, path in sorted(reads.items())}}


def setting_changes(saved: Mapping[str, Any], now: Mapping[str, Any], stage: str
                    ) -> tuple[dict[str, list[Any]], str | None]:
    """``({field: [checkpoint's, now]}, the first change a resume cannot take on, or None)``.

    Fields the checkpoint does not know (added to icot since) are not compared.
    """
    changed = {k: [saved[k], now[k]] for k in sorted(now) if k in saved and saved[k] != now[k]}
    allowed = {f"{stage}.{name}" for name in RESUMABLE}
    for key, (before, current) in changed.items():
        if key not in allowed:
            return changed, (f"field '{key}' was {before!r} when this checkpoint was written and is {current!r} "
                             f"now; a resumed run keeps its settings (only {stage}.{{{','.join(RESUMABLE)}}} may "
                             "change)")
    return changed, None


def checkpoint_refusal(out_dir: str | Path, settings: Mapping[str, Any], stage: str) -> str | None:
    """Why the checkpoint in ``out_dir`` cannot be resumed with ``settings`` (None: it can, or there is none
    to read); the pipeline trains such a stage afresh, ``icot train --resume`` refuses."""
    path = checkpoint_dir(out_dir)
    if path is None:
        return None
    try:
        saved = json.loads((path / STATE_FILE).read_text(encoding="utf-8")).get("settings")
    except (OSError, ValueError, AttributeError):
        return None  # unreadable: resuming reports it with the file named
    if not isinstance(saved, dict):
        return "the checkpoint was written by an older icot (no field 'settings')"
    return setting_changes(saved, settings, stage)[1]


class _Trainer:
    """One run of :func:`train_stage`; its methods are the phases of the loop."""

    def __init__(self, stage: Stage, cfg: TrainConfig, out_dir: Path, run_config: IcotConfig, progress: bool,
                 settings: dict[str, Any]):
        self.stage, self.cfg, self.out_dir, self.run_config = stage, cfg, out_dir, run_config
        self.settings = settings
        self.accelerator = _accelerator(stage, cfg, out_dir)
        self.main = self.accelerator.is_main_process
        set_seed(cfg.seed)
        self.micro = _micro_batch(stage, cfg, self.accelerator.num_processes)
        self.log = _Logger(out_dir / "metrics.jsonl", self.main, self.accelerator if cfg.log_with else None)
        self.position = _Position()
        self.progress = progress
        self._identity: dict[str, Any] | None = None
        self.done, self.at_boundary, self.extra, self.changed = False, True, {}, {}
        # Micro-batch losses not yet read back: reading each one at once (.item()) would make the host wait
        # for the device every step; they are read together when the run logs or saves (_read_losses).
        self.pending: list[torch.Tensor] = []
        self.stopped_by = ""  # what ended the run: max_steps, epochs, max_minutes or patience

    @property
    def identity(self) -> dict[str, Any]:
        """What a checkpoint shares with the run that resumes it (computed at the first save or resume:
        hashing 808k training items takes seconds)."""
        if self._identity is None:
            self._identity = {"stage": self.stage.name, "num_processes": self.accelerator.num_processes,
                              "batch_size": self.cfg.batch_size, "grad_accum": self.cfg.grad_accum,
                              "seed": self.cfg.seed, "train_examples": len(self.stage.train_items),
                              "train_sha256": train_fingerprint(self.stage.train_items)}
        return self._identity

    # -- setup ------------------------------------------------------------------------------------

    def _checkpoint_state(self) -> tuple[Path, dict[str, Any]]:
        if self.main:  # a run killed while saving may have left its last checkpoint or best model aside
            for name in (CHECKPOINT, BEST):
                recover_atomically(self.out_dir / name)
        self.accelerator.wait_for_everyone()
        path = checkpoint_dir(self.out_dir)
        if path is None:
            raise CheckpointError("no checkpoint to resume from (train with save_every > 0, or stop with "
                                  "SIGINT/SIGTERM)", self.out_dir / CHECKPOINT)
        state = read_trainer_state(path, self.identity)
        self.changed = self._setting_changes(path, state)
        return path, state

    def _setting_changes(self, path: Path, state: dict[str, Any]) -> dict[str, list[Any]]:
        """``{field: [checkpoint's, now]}`` of the settings this resumed run changes; refuses any change it
        cannot take on (:func:`setting_changes`), naming the field, and a budget the checkpoint is past."""
        changed, refused = setting_changes(state["settings"], self.settings, self.stage.name)
        if refused:
            raise CheckpointError(f"{refused}: resume with the checkpoint's value, or train afresh (icot train "
                                  "--overwrite; icot pipeline does so by itself)", path / STATE_FILE)
        step = state["position"].get("step", 0)
        if self.cfg.max_steps and step > self.cfg.max_steps:
            raise CheckpointError(f"field '{self.stage.name}.max_steps' is {self.cfg.max_steps}, but this checkpoint "
                                  f"is at step {step}: give at least {step}", path / STATE_FILE)
        return changed

    def _prepare_directory(self, state: dict[str, Any] | None) -> None:
        if not self.main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Until this run finishes the directory must not look done, even if an earlier run finished there.
        write_meta(self.out_dir, {"kind": "stage", "stage": self.stage.name, "model": BEST, "status": "running"})
        save_config(self.run_config, self.out_dir / "config.yaml")
        if state is None:
            (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)
            shutil.rmtree(self.out_dir / "tracking", ignore_errors=True)  # a tracker mirrors this run only
            remove_checkpoints(self.out_dir)  # a stale one must never be resumed into this run
        else:
            self.log.truncate(state["position"]["metrics_lines"])

    def _build(self) -> None:
        stage, cfg = self.stage, self.cfg
        self.params = [p for p in stage.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        loader = DataLoader(list(stage.train_items), batch_size=self.micro, shuffle=True, drop_last=True,
                            collate_fn=stage.collate, generator=self.generator)
        if len(loader) < cfg.grad_accum:
            raise ConfigError(f"field '{stage.name}.batch_size': {len(stage.train_items)} training examples are "
                              f"fewer than one batch of {cfg.batch_size}")
        self.module, self.optimizer, self.loader = self.accelerator.prepare(stage.module, self.optimizer, loader)
        # Without the torch.compile wrapper: its state_dict names every tensor '_orig_mod.<name>', which neither
        # a checkpoint nor save_pretrained should carry.
        self.unwrapped = self.accelerator.unwrap_model(self.module, keep_torch_compile=False)
        self.sharded = is_sharded(self.unwrapped)
        # FSDP replaced the parameters by their shards (and gave those to the optimizer): clip those.
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        steps_per_epoch = len(self.loader) // cfg.grad_accum
        self.total_steps = math.ceil(cfg.epochs * steps_per_epoch)
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        # Not given to Accelerate, which would step it once per process: the global batch is fixed, so
        # one optimizer step is one scheduler step whatever the number of processes.
        schedule = functools.partial(lr_factor, cfg=cfg, total_steps=self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: schedule(step) * stage.lr_scale(step))

    def _restore(self, path: Path, state: dict[str, Any]) -> None:
        self.epoch_start = load_training_state(path, state, self.accelerator, self.optimizer, self.scheduler,
                                               self.unwrapped)
        try:
            self.position = _Position(**state["position"])
        except TypeError as e:
            raise CheckpointError(f"field 'position' does not fit: {e}", path / STATE_FILE) from None
        self.log.lines = self.position.metrics_lines
        if self.changed:  # what this run changed, in the record beside the metrics it affects
            self.log({"event": "resume", "step": self.position.step, "changed": self.changed})
        for step in range(self.position.step):  # rebuild the stage's curriculum state (see Stage.begin_step)
            self.stage.begin_step(step)

    # -- the loop ---------------------------------------------------------------------------------

    def run(self, resume: bool) -> dict[str, Any]:
        path, state = self._checkpoint_state() if resume else (None, None)
        if state is not None:
            self.stage.restore_decisions(state.get("stage_decisions", {}))
        self.stage.check_budget()
        self._prepare_directory(state)
        try:
            return self._run(path, state)
        finally:
            # Trackers only: Accelerator.end_training would also end the process group that later stages use.
            for tracker in self.accelerator.trackers:
                tracker.finish()

    def _run(self, path: Path | None, state: dict[str, Any] | None) -> dict[str, Any]:
        if self.cfg.log_with:  # trackers take scalars: lists and None as text
            self.accelerator.init_trackers(self.stage.name, config={
                k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in self.settings.items()})
        if state is not None:
            load_module_state(path, self.stage.module)  # before DDP wraps it
        self._build()
        if state is not None:
            self._restore(path, state)
        p = self.position
        self.start = time.monotonic() - p.elapsed
        self.deadline = self.start + self.cfg.max_minutes * 60 if self.cfg.max_minutes else math.inf
        self.done = p.step >= self.total_steps
        self.bar = progress_bar(self.total_steps, self.stage.name, initial=p.step, enabled=self.progress and self.main)
        try:
            with StopSignals() as stop:
                self.module.train()
                while not self.done:
                    self._epoch(stop)
                if self.stopped_by != "patience":  # patience stops right after a validation
                    self._validate_and_keep()
        finally:
            self.bar.close()
        # A signal during the last step or the final validation came after the loop's last look at it: the
        # stage is complete, so it is written as done, and the run stops there instead of going on.
        signum, _ = self._stop_requests(stop)
        result = self._finish()
        if signum:
            raise TrainingInterrupted(signum, self.position.step, self.out_dir, finished=True)
        return result

    def _epoch(self, stop: StopSignals) -> None:
        p = self.position
        if p.batches_in_epoch:
            # Resuming mid-epoch: the epoch's shuffle again, without the micro-batches already trained on.
            self.generator.set_state(self.epoch_start)
            loader = self.accelerator.skip_first_batches(self.loader, p.batches_in_epoch)
        else:
            self.epoch_start = self.generator.get_state()
            loader = self.loader
        for batch in loader:
            self._micro_step(batch)
            if self.accelerator.sync_gradients:
                self._end_step(stop)
                if self.done:
                    return
        p.epoch, p.batches_in_epoch = p.epoch + 1, 0

    def _micro_step(self, batch: dict[str, torch.Tensor]) -> None:
        acc, p = self.accelerator, self.position
        if self.at_boundary and self.stage.begin_step(p.step):
            # A new curriculum stage: Adam's moments describe the old task, start them afresh.
            self.optimizer.state.clear()
            self.log({"event": "optimizer_reset", "step": p.step})
        with acc.accumulate(self.module):
            with acc.autocast():
                loss, self.extra = self.stage.loss(self.module, batch)
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
            self.optimizer.step()
            if acc.sync_gradients and not acc.optimizer_step_was_skipped:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        p.micro_steps += 1
        p.batches_in_epoch += 1
        self.pending.append(loss.detach().float())  # () on the device
        self.at_boundary = acc.sync_gradients

    def _end_step(self, stop: StopSignals) -> None:
        p, cfg = self.position, self.cfg
        p.step += 1
        p.examples += cfg.batch_size
        self.bar.update(1)
        if p.step % cfg.log_every == 0:
            self._log_train()
        signum, out_of_time = self._stop_requests(stop)
        if p.step >= self.total_steps or out_of_time:
            self.done = True
            self.stopped_by = "max_minutes" if p.step < self.total_steps else self._budget_name()
            return
        if cfg.eval_every and p.step % cfg.eval_every == 0:
            self._validate_and_keep()
            if cfg.patience and p.stale >= cfg.patience:
                self.done, self.stopped_by = True, "patience"
                return
        if signum or (cfg.save_every and p.step % cfg.save_every == 0):
            path = self._save_checkpoint()
            if signum:
                raise TrainingInterrupted(signum, p.step, path)

    def _budget_name(self) -> str:
        """The field whose budget ``total_steps`` is: ``max_steps`` when it is the smaller, else ``epochs``."""
        return "max_steps" if self.cfg.max_steps and self.total_steps == self.cfg.max_steps else "epochs"

    def _stop_requests(self, stop: StopSignals) -> tuple[int | None, bool]:
        """``(signal, out of time)`` agreed by all processes: a launcher may signal only some of them, and
        clocks differ, but all must stop (and save) at the same step."""
        local = [stop.signum or 0, int(time.monotonic() > self.deadline)]
        rows = [local]
        if self.accelerator.num_processes > 1:
            rows = self.accelerator.gather(torch.tensor([local], device=self.accelerator.device)).tolist()
        signals = [row[0] for row in rows if row[0]]
        return (signals[0] if signals else None), any(row[1] for row in rows)

    def _elapsed(self) -> float:
        return time.monotonic() - self.start

    def _read_losses(self) -> None:
        """Move the pending micro-batch losses into ``position.running`` with one read-back."""
        if self.pending:
            self.position.running.extend(torch.stack(self.pending).tolist())
            self.pending.clear()

    def _log_train(self) -> None:
        p = self.position
        self._read_losses()
        # Each process saw its own micro-batches: the logged loss is the global batch's.
        values = mean_across({"loss": sum(p.running) / len(p.running), **self.extra})
        loss = values.pop("loss")
        self.log({"event": "train", "step": p.step, "examples": p.examples, "seconds": self._elapsed(),
                  "loss": loss, "lr": self.scheduler.get_last_lr()[0], **values})
        self.bar.set_description(f"{self.stage.name} loss {loss:.4f}")
        p.running.clear()

    def _validate_and_keep(self) -> None:
        p, unwrapped = self.position, self.unwrapped
        unwrapped.eval()
        # Under FSDP each process decodes its own validation shard with whole weights (see gathered).
        with torch.no_grad(), gathered(unwrapped):
            metrics = self.stage.validate(unwrapped)
        unwrapped.train()
        self.stage.after_validation(p.step, metrics)
        eligible = bool(metrics.get("eligible", True))
        by = self.cfg.keep_best_by
        improved = eligible and (p.best is None or _score(metrics, by) > _score(p.best, by))
        if eligible:
            p.stale = 0 if improved else p.stale + 1
        if improved:
            p.best = {**metrics, "step": p.step}
            save = functools.partial(self.stage.save, unwrapped)
            if self.sharded:  # every process gathers; the main one receives the weights
                save = functools.partial(save, state_dict=full_state(unwrapped))
            if self.main:
                save_atomically(self.out_dir / BEST, save)
        self.log({"event": "validate", "step": p.step, "examples": p.examples, "seconds": self._elapsed(),
                  "improved": improved, **{f"val_{k}": v for k, v in metrics.items()}})
        self.bar.set_postfix(acc=f"{metrics['accuracy']:.3f}", val_loss=f"{metrics['loss']:.3f}")
        self.accelerator.wait_for_everyone()

    def _save_checkpoint(self) -> Path:
        p, acc = self.position, self.accelerator
        p.elapsed, p.metrics_lines = self._elapsed(), self.log.lines
        self._read_losses()
        running = p.running
        if acc.num_processes > 1 and running:
            # Per-entry means over processes give the same next train log as each process's own list.
            running = acc.reduce(torch.tensor(running, device=acc.device), reduction="mean").tolist()
        state = {**self.identity, "settings": self.settings, "stage_decisions": self.stage.decisions(),
                 "position": {**dataclasses.asdict(p), "running": running}}
        return save_checkpoint(self.out_dir, acc, self.unwrapped, self.optimizer, self.scheduler, state,
                               self.epoch_start)

    def _finish(self) -> dict[str, Any]:
        p = self.position
        if p.best is None:
            raise RuntimeError(f"{self.stage.name}: no validation was eligible for keeping; train longer")
        result = {"steps": p.step, "examples": p.examples, "seconds": self._elapsed(), "best": p.best,
                  "stopped_by": self.stopped_by or self._budget_name(),
                  # this sitting's (a resume may have changed them), ``auto`` resolved
                  "mixed_precision": self.accelerator.mixed_precision, "compile": self.cfg.compile}
        if self.main:
            write_meta(self.out_dir, {"kind": "stage", "stage": self.stage.name, "model": BEST, "status": "done",
                                      **result})
            remove_checkpoints(self.out_dir)  # the stage is complete; nothing is left to resume
        self.accelerator.wait_for_everyone()
        return result


def train_stage(stage: Stage, cfg: TrainConfig, out_dir: str | Path, run_config: IcotConfig,
                progress: bool = True, resume: bool = False, depends: Sequence[str] | None = None,
                reads: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Train ``stage`` with ``cfg`` and keep its best validated model in ``out_dir/best``.

    Args:
        stage: what to train.
        cfg: the stage's training section.
        out_dir: the stage directory.
        run_config: the whole run's config, saved beside the models.
        progress: show a progress bar.
        resume: continue from ``out_dir/checkpoint`` (same data order, optimizer and RNG states: the result
            equals an uninterrupted run's to float tolerance).
        depends: the config sections the stage's output depends on (``icot.training.stages.depends``; all
            sections by default); a resumed run may change only its own ``RESUMABLE`` fields of them.
        reads: the stage directories the stage reads (``{"teacher": DIR}``); a resumed run must read the same.

    Returns:
        ``{"steps", "examples", "seconds", "best": metrics of the kept model, "stopped_by": "max_steps" |
        "epochs" | "max_minutes" | "patience"}``.

    Raises:
        TrainingInterrupted: on SIGINT/SIGTERM, after writing a checkpoint.
        CheckpointError: when ``resume`` finds no checkpoint or one that does not fit.
    """
    sections = depends if depends is not None else [f.name for f in dataclasses.fields(run_config)]
    settings = run_settings(run_config, sections, reads or {})
    return _Trainer(stage, cfg, Path(out_dir), run_config, progress, settings).run(resume)
