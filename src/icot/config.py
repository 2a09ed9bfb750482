"""Typed configuration: dataclasses with defaults and range checks, YAML files, ``--section.key value`` flags.

One :class:`IcotConfig` describes a whole run; each stage reads the sections it needs (``data``,
``model`` and its own training section). The resolved config is written beside every checkpoint
(``config.yaml``) so that a run can be reproduced and a finished stage recognised.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from icot.errors import ConfigError


def _check(cond: bool, name: str, problem: str) -> None:
    if not cond:
        raise ConfigError(f"field '{name}': {problem}")


@dataclass
class GenerateConfig:
    """Multiplication data the pipeline generates for itself (``data.generate``).

    Training and validation lines are drawn excluding every INPUT of the test file (and validation
    excludes training), written to ``RUN_DIR/data/{train,valid}.txt``. For sizes without a shared test
    file, ``test_count`` > 0 with an empty ``data.test`` generates one first (``RUN_DIR/data/test.txt``).

    Attributes:
        digits, digits_b: operand sizes N x M (``digits_b`` 0 means M = N).
        train_count, valid_count, test_count: lines to generate.
        seed: seed of the draw.
    """

    digits: int = 4
    digits_b: int = 0
    train_count: int = 808_000
    valid_count: int = 1000
    test_count: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.digits > 0, "data.generate.digits", "must be > 0")
        _check(self.digits_b >= 0, "data.generate.digits_b", "must be >= 0")
        _check(self.train_count > 0, "data.generate.train_count", "must be > 0")
        _check(self.valid_count > 0, "data.generate.valid_count", "must be > 0")
        _check(self.test_count >= 0, "data.generate.test_count", "must be >= 0")


@dataclass
class DataConfig:
    """Where the examples come from.

    Attributes:
        train: training file (``INPUT||COT #### ANSWER`` per line).
        valid: validation file, used for keep-best selection during training.
        test: test file, used by the pipeline's final evaluation.
        max_train_examples: use only the first N training lines (None: all of them).
        generate: let ``icot pipeline`` generate multiplication train/valid files (then leave
            ``train`` and ``valid`` empty).
    """

    train: str = ""
    valid: str = ""
    test: str = ""
    max_train_examples: int | None = None
    generate: GenerateConfig | None = None

    def __post_init__(self) -> None:
        if self.max_train_examples is not None:
            _check(self.max_train_examples > 0, "data.max_train_examples", "must be > 0")


@dataclass
class ModelConfig:
    """The causal LM every stage starts from.

    Attributes:
        name_or_path: a Hugging Face model id or a local directory; empty builds a GPT-2 from scratch
            with the sizes below and a tokenizer built from the training data.
        n_layer, n_embd, n_head, n_positions, dropout: from-scratch GPT-2 shape.
        tokenizer: from-scratch vocabulary kind: ``word`` (whitespace-separated symbols, for
            multiplication) or ``bpe`` (byte-level BPE, for natural language).
        bpe_vocab_size: vocabulary size of a ``bpe`` tokenizer.
        answer_marker: text placed right before ANSWER in every layout (the papers' ``####``: constant
            positions to compute in before the first answer token, for every method alike); "" = none.
    """

    name_or_path: str = ""
    n_layer: int = 6
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 512
    dropout: float = 0.0
    tokenizer: str = "word"
    bpe_vocab_size: int = 2000
    answer_marker: str = ""

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_embd", "n_head", "n_positions"):
            _check(getattr(self, name) > 0, f"model.{name}", "must be > 0")
        _check(self.n_embd % self.n_head == 0, "model.n_embd", "must be divisible by model.n_head")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        _check(self.tokenizer in ("word", "bpe"), "model.tokenizer", "must be 'word' or 'bpe'")
        _check(self.bpe_vocab_size >= 300, "model.bpe_vocab_size", "must be >= 300 (256 bytes + specials)")


LR_SCHEDULES = ("constant", "linear", "cosine")
TRACKERS = ("", "tensorboard", "wandb", "mlflow")  # Accelerate's tracker names ("": none)


@dataclass
class TrainConfig:
    """One training stage on the shared loop.

    Attributes:
        epochs: passes over the training data (fractions allowed).
        max_steps: stop after this many optimizer steps (0: no limit besides epochs).
        max_minutes: stop after this much wall time (0: no limit); validation runs before stopping.
        batch_size: examples per optimizer step across all processes (the global batch).
        grad_accum: micro-batches accumulated into one optimizer step.
        lr, weight_decay, warmup_steps, max_grad_norm: AdamW and its warm-up (linear).
        lr_schedule: after warm-up, ``constant`` (the papers), or ``linear``/``cosine`` decay to
            ``min_lr_ratio * lr`` at the stage's last step (``max_steps``, else ``epochs``); a decay
            lets a from-scratch model settle on a peak instead of oscillating around it.
        min_lr_ratio: the decayed learning rate's floor, as a fraction of ``lr``.
        eval_every: validate every N optimizer steps (0: only at the end).
        eval_examples: validation lines decoded for exact-match accuracy.
        eval_batch_size: batch size of validation decoding.
        seed: seed of initialisation, data order and every random draw.
        mixed_precision: ``no``, ``fp16`` or ``bf16`` (passed to Accelerate). On a CPU with AVX512_BF16
            bf16 autocast trains a 2-layer 768-wide GPT-2 2.5x faster than fp32 (benchmarks/train_speed.py).
        compile: compile the training forward with ``torch.compile`` (inductor, dynamic shapes) through
            Accelerate; 1.3-1.5x per step on this CPU after a compilation of 20-40 s.
        init_from: start from this stage's output directory (empty: the stage's own default).
        log_every: write training loss to metrics.jsonl every N optimizer steps.
        save_every: write an exact-resume checkpoint (``OUT/checkpoint/``) every N optimizer steps
            (0: only when SIGINT/SIGTERM stops the run); ``--resume`` continues from it.
        log_with: also send every logged number to an experiment tracker through Accelerate
            (``tensorboard``: ``OUT/tracking/``, needs ``pip install tensorboard``; ``wandb``, ``mlflow``);
            empty: ``metrics.jsonl`` only, which is always written and stays the record.
    """

    epochs: float = 1.0
    max_steps: int = 0
    max_minutes: float = 0.0
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 500
    eval_examples: int = 200
    eval_batch_size: int = 128
    seed: int = 0
    mixed_precision: str = "no"
    compile: bool = False
    init_from: str = ""
    log_every: int = 50
    save_every: int = 0
    log_with: str = ""

    # Name used in errors; the loader rewrites it to the real section ('teacher', 'couple', ...).
    SECTION: typing.ClassVar[str] = "train"

    def __post_init__(self) -> None:
        self._check_ranges(self.SECTION)

    def _check_ranges(self, section: str) -> None:
        _check(0 < self.epochs < math.inf, f"{section}.epochs", "must be > 0 and finite")
        _check(self.max_steps >= 0, f"{section}.max_steps", "must be >= 0")
        _check(self.max_minutes >= 0, f"{section}.max_minutes", "must be >= 0")
        _check(self.batch_size > 0, f"{section}.batch_size", "must be > 0")
        _check(self.grad_accum > 0, f"{section}.grad_accum", "must be > 0")
        _check(self.batch_size % self.grad_accum == 0, f"{section}.batch_size",
               "must be divisible by grad_accum")
        _check(0 < self.lr < 1, f"{section}.lr", "must be in (0, 1)")
        _check(self.weight_decay >= 0, f"{section}.weight_decay", "must be >= 0")
        _check(self.warmup_steps >= 0, f"{section}.warmup_steps", "must be >= 0")
        _check(self.lr_schedule in LR_SCHEDULES, f"{section}.lr_schedule",
               "must be " + " or ".join(f"'{x}'" for x in LR_SCHEDULES))
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"{section}.min_lr_ratio", "must be in [0, 1]")
        _check(self.max_grad_norm > 0, f"{section}.max_grad_norm", "must be > 0")
        _check(self.eval_every >= 0, f"{section}.eval_every", "must be >= 0")
        _check(self.eval_examples > 0, f"{section}.eval_examples", "must be > 0")
        _check(self.eval_batch_size > 0, f"{section}.eval_batch_size", "must be > 0")
        _check(self.mixed_precision in ("no", "fp16", "bf16"), f"{section}.mixed_precision",
               "must be 'no', 'fp16' or 'bf16'")
        _check(self.log_every > 0, f"{section}.log_every", "must be > 0")
        _check(self.save_every >= 0, f"{section}.save_every", "must be >= 0")
        _check(self.log_with in TRACKERS, f"{section}.log_with", "must be " + ", ".join(f"'{x}'" for x in TRACKERS))


SUBSETS = ("diagonal", "first_column", "last_column", "top_row", "bottom_row")


@dataclass
class KDConfig:
    """ICoT-KD options shared by the student, emulator and couple stages.

    Attributes:
        subset: teacher states to distil: ``diagonal`` or an ablation (``first_column``,
            ``last_column``, ``top_row``, ``bottom_row``).
        delta: ``dynamic`` (spread the L layers evenly over the CoT) or a fixed integer step.
        init_from_teacher: start student and emulator from the teacher's weights (the papers start
            all three from the same pretrained GPT-2; from scratch, the teacher is the shared start).
        mixture_size: K mixture components of the emulator (1: none; GSM8K uses several).
        mixture_loss_weight: weight of the emulator's component classification loss.
    """

    subset: str = "diagonal"
    delta: str = "dynamic"
    init_from_teacher: bool = True
    mixture_size: int = 1
    mixture_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        _check(self.subset in SUBSETS, "kd.subset", f"must be one of {', '.join(SUBSETS)}")
        if self.delta != "dynamic":
            _check(str(self.delta).isdigit() and int(self.delta) > 0, "kd.delta",
                   "must be 'dynamic' or a positive integer")
        _check(self.mixture_size >= 1, "kd.mixture_size", "must be >= 1")
        _check(self.mixture_loss_weight >= 0, "kd.mixture_loss_weight", "must be >= 0")

    @property
    def delta_value(self) -> str | int:
        """``"dynamic"`` or the integer step."""
        return "dynamic" if self.delta == "dynamic" else int(self.delta)


@dataclass
class StepwiseConfig:
    """ICoT-SI options (stepwise internalization, METHOD.md).

    The schedule is the original code's: CoT tokens go one at a time, one every
    ``round(E / remove_per_epoch)`` optimizer steps, where E is ``steps_per_epoch``.

    Attributes:
        remove_per_epoch: CoT tokens removed per epoch (the paper's Delta, 8).
        steps_per_epoch: optimizer steps that count as one epoch of the schedule; 0 = one pass over
            the training data (the paper's epoch). Counting in steps makes the schedule independent of
            the data size (80,800 lines at batch 32 is 2525 steps, Bai et al.'s epoch).
        removal_smoothing_lambda: lambda of the random extra offset ``P(o) ∝ exp(-lambda o)``;
            ``.inf`` turns smoothing off.
        remove_all_when_remove_beyond: once the schedule removes more than this many tokens, remove
            the whole CoT (0: never; the CoT then goes when the schedule passes its length).
        reset_optimizer: build a fresh AdamW state at every one-token increment until the whole CoT is
            gone (the original's ``--reset_optimizer``, used in the papers' runs).
        reset_warmup_steps: after each reset, ramp the learning rate linearly over this many steps
            (ours, 0 = off as in the original): fresh Adam moments make the first updates full-sized.
        keep_position: removed tokens keep their position ids (the original's ``--keep_position``:
            from the first ``<sep>`` on, every position moves right by the number removed), and the
            internalized model answers at those positions; needs CoTs of one length (multiplication).
        from_teacher: start from the explicit-CoT teacher stage (the paper); false trains from
            ``model`` with the schedule running from step 0 (Bai et al.'s from-scratch recipe), and the
            pipeline then needs no teacher for ``icot-si``.
    """

    remove_per_epoch: int = 8
    steps_per_epoch: int = 0
    removal_smoothing_lambda: float = 4.0
    remove_all_when_remove_beyond: int = 0
    reset_optimizer: bool = True
    reset_warmup_steps: int = 0
    keep_position: bool = False
    from_teacher: bool = True

    def __post_init__(self) -> None:
        _check(self.remove_per_epoch > 0, "si.remove_per_epoch", "must be > 0")
        _check(self.steps_per_epoch >= 0, "si.steps_per_epoch", "must be >= 0")
        _check(self.removal_smoothing_lambda > 0, "si.removal_smoothing_lambda", "must be > 0 (.inf: no smoothing)")
        _check(self.remove_all_when_remove_beyond >= 0, "si.remove_all_when_remove_beyond", "must be >= 0")
        _check(self.reset_warmup_steps >= 0, "si.reset_warmup_steps", "must be >= 0")


EVAL_DTYPES = ("float32", "bfloat16", "float16")


def parse_sizes(text: str | Sequence[str]) -> list[tuple[int, int]]:
    """``"3x3,4x5"`` (or ``["3x3", "4x5"]``) -> ``[(3, 3), (4, 5)]``: operand digits ``N x M``.

    Raises:
        ConfigError: naming the entry that is not ``NxM`` with N, M >= 1.
    """
    entries = text.split(",") if isinstance(text, str) else list(text)
    sizes = []
    for entry in entries:
        parts = entry.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
            raise ConfigError(f"size {entry.strip()!r} is not NxM with N, M >= 1 digits (e.g. 3x4)")
        sizes.append((int(parts[0]), int(parts[1])))
    if not sizes:
        raise ConfigError("no sizes given (e.g. 3x3,4x5)")
    return sizes


@dataclass
class EvalConfig:
    """Final evaluation.

    Attributes:
        batch_size: batch size of the headline (paper-style) throughput, 1 in the papers.
        batched_size: a second, batched measurement (0: skip).
        limit: evaluate the first N test lines (0: all).
        max_new_tokens: decoding budget per example.
        device: where the models decode: ``auto`` (Accelerate's device: a GPU when there is one), ``cpu``,
            ``cuda``, ``cuda:1``, ...
        dtype: weights' dtype while decoding: ``float32``, ``bfloat16`` or ``float16``.
        sizes: also score every method on generated multiplication problems of these operand sizes
            (``["3x3", "4x5"]``; empty: skip), out of distribution for a model trained on another size.
        sizes_count: problems per size (none of them a training INPUT).
        sizes_seed: seed of those problems.
        saved_models: model or stage directories trained elsewhere (e.g. the committed
            ``results/si-4x4/model``) evaluated beside the methods on the same test file and batch sizes,
            one row each named by its path; the pipeline trains nothing for them.
        probe_lines: multiplication only: fit ``icot probe``'s linear probes of every method's states on this many
            training lines and score them on the test lines (``eval.limit`` of them); results.md gets the
            best-layer summary, ``RUN_DIR/probes/`` the JSON and heatmaps (0: no probes).
    """

    batch_size: int = 1
    batched_size: int = 256
    limit: int = 0
    max_new_tokens: int = 256
    device: str = "auto"
    dtype: str = "float32"
    sizes: list[str] = field(default_factory=list)
    sizes_count: int = 200
    sizes_seed: int = 12345
    saved_models: list[str] = field(default_factory=list)
    probe_lines: int = 0

    def __post_init__(self) -> None:
        for i, path in enumerate(self.saved_models):
            _check(bool(path.strip()), f"eval.saved_models[{i}]", "must be a model directory, not empty")
        if self.sizes:
            try:
                parse_sizes(self.sizes)
            except ConfigError as e:
                raise ConfigError(f"field 'eval.sizes': {e.problem}") from None
        _check(self.sizes_count > 0, "eval.sizes_count", "must be > 0")
        _check(self.sizes_seed >= 0, "eval.sizes_seed", "must be >= 0")
        _check(self.probe_lines == 0 or self.probe_lines >= 2, "eval.probe_lines", "must be 0 (off) or >= 2")
        _check(self.batch_size > 0, "eval.batch_size", "must be > 0")
        _check(self.batched_size >= 0, "eval.batched_size", "must be >= 0")
        _check(self.limit >= 0, "eval.limit", "must be >= 0")
        _check(self.max_new_tokens > 0, "eval.max_new_tokens", "must be > 0")
        _check(self.dtype in EVAL_DTYPES, "eval.dtype", f"must be one of {', '.join(EVAL_DTYPES)}")


METHODS = ("nocot", "explicit", "icot-kd", "icot-si")


@dataclass
class IcotConfig:
    """A whole run: data, model, one training section per stage, and evaluation."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TrainConfig = field(default_factory=TrainConfig)
    nocot: TrainConfig = field(default_factory=TrainConfig)
    student: TrainConfig = field(default_factory=TrainConfig)
    emulator: TrainConfig = field(default_factory=TrainConfig)
    couple: TrainConfig = field(default_factory=TrainConfig)
    stepwise: TrainConfig = field(default_factory=TrainConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    si: StepwiseConfig = field(default_factory=StepwiseConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    methods: list[str] = field(default_factory=lambda: list(METHODS))

    def __post_init__(self) -> None:
        for m in self.methods:
            _check(m in METHODS, "methods", f"unknown method '{m}' (known: {', '.join(METHODS)})")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML/JSON-safe)."""
        return dataclasses.asdict(self)

    def section(self, *names: str) -> dict[str, Any]:
        """The named sections as a dict, used to decide whether a stage's output is up to date."""
        return {n: dataclasses.asdict(getattr(self, n)) if dataclasses.is_dataclass(getattr(self, n))
                else getattr(self, n) for n in names}


# Fields that never change what a stage produces: how often it logs and saves, where its numbers are also
# sent, and the test file (read by the final evaluation only). Whether a finished stage is up to date and
# whether a checkpoint belongs to this run are decided on everything else (:func:`output_settings`).
NEUTRAL_FIELDS = ("save_every", "log_every", "log_with")
NEUTRAL_DATA = ("test",)


def output_settings(config: IcotConfig, sections: Sequence[str]) -> dict[str, Any]:
    """``{"section.field": value}`` of ``sections`` that can change a stage's output, as JSON gives them
    back (tuples as lists), with the training and validation files as absolute paths."""
    flat: dict[str, Any] = {}
    for name, values in config.section(*sections).items():
        if not isinstance(values, dict):
            flat[name] = values
            continue
        for key, value in values.items():
            if key in NEUTRAL_FIELDS or (name == "data" and key in NEUTRAL_DATA):
                continue
            if name == "data" and key in ("train", "valid") and value:
                value = str(Path(value).resolve())
            flat[f"{name}.{key}"] = value
    return json.loads(json.dumps(flat))


# ---------------------------------------------------------------------------------------------
# Loading from YAML and flags


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check/convert a YAML value to the annotated type ``tp``; raise ConfigError naming ``name``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], name)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"field '{name}': expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"field '{name}': expected a mapping, got {value!r}")
        return _from_dict(tp, value, name)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"field '{name}': expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"field '{name}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"field '{name}': expected a number, got {value!r}")
        if math.isnan(float(value)):
            raise ConfigError(f"field '{name}': NaN is not allowed")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"field '{name}': expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"field '{name}': unsupported type {tp!r}")


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known, key=str)  # YAML keys may be numbers too
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown field '{where}{unknown[0]}' (known: {', '.join(sorted(known))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        section = getattr(cls, "SECTION", None)
        if section and prefix and section != prefix:
            raise ConfigError(e.problem.replace(f"'{section}.", f"'{prefix}."), e.path, e.line) from None
        raise


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '--{dotted}': '{k}' is not a section")
    node[keys[-1]] = value


class RawOverride(str):
    """A flag's value as typed; read as YAML for non-string fields, kept verbatim for string fields."""


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ``["--teacher.lr", "1e-3", "--data.test", "f.txt"]`` into a nested dict of :class:`RawOverride`.

    ``key=value`` works too. The values get their types in :func:`load_config`, which knows each field's
    type: ``--data.test yes`` stays the string ``"yes"`` while ``--teacher.lr 1e-3`` becomes a float.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(pairs):
        tok = pairs[i]
        if not tok.startswith("--"):
            raise ConfigError(f"override '{tok}': expected --section.key VALUE")
        key = tok[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(pairs):
                raise ConfigError(f"override '--{key}': missing value")
            raw = pairs[i + 1]
            i += 2
        _set_dotted(out, key.replace("-", "_"), RawOverride(raw))
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _fix_types(data: dict[str, Any], cls: type) -> dict[str, Any]:
    """Give flag values their field's type, and let YAML's ``1`` or ``1e-3`` stand for floats."""
    hints = typing.get_type_hints(cls)
    out = {}
    for k, v in data.items():
        tp = _unwrap_optional(hints.get(k))
        if isinstance(v, RawOverride):
            v = str(v) if tp is str else yaml.safe_load(v)
        if tp is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        elif tp is float and isinstance(v, str):
            # PyYAML reads "1e-3" (no dot) as a string.
            try:
                v = float(v)
            except ValueError:
                pass
        elif tp is str and isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        elif tp is not None and dataclasses.is_dataclass(tp) and isinstance(v, dict):
            v = _fix_types(v, tp)
        out[k] = v
    return out


def _refuse_duplicate_keys(node: yaml.Node | None) -> None:
    """PyYAML keeps the last of two equal keys in a mapping; a config that says a thing twice is an error.

    Walks the composed node tree before any object is constructed from it.
    """
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    raise yaml.MarkedYAMLError(problem=f"key '{key.value}' given twice (line {key.start_mark.line + 1})",
                                               problem_mark=key.start_mark)
                seen.add(key.value)
            _refuse_duplicate_keys(value)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item)


def _read_yaml(text: str) -> Any:
    """``yaml.safe_load`` in its two steps, one parse: compose the nodes, refuse a repeated key, construct."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        _refuse_duplicate_keys(node)
        return None if node is None else loader.construct_document(node)
    finally:
        loader.dispose()


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> IcotConfig:
    """Read a YAML config (or defaults when ``path`` is None) and apply overrides.

    Raises:
        ConfigError: naming the file and the field for unknown fields, wrong types and bad ranges.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = _read_yaml(Path(path).read_text(encoding="utf-8"))
        except yaml.MarkedYAMLError as e:  # one line: the problem and where, without PyYAML's excerpt
            where = f" (line {e.problem_mark.line + 1})" if e.problem_mark and "line" not in str(e.problem) else ""
            raise ConfigError(f"cannot read config: {e.problem}{where}", path) from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config: {e}", path) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError("the top level must be a mapping of sections", path)
        data = loaded or {}
    if overrides:
        extra = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        data = _merge(data, extra)
    try:
        return _from_dict(IcotConfig, _fix_types(data, IcotConfig))
    except ConfigError as e:
        if path is not None and e.path is None:
            raise ConfigError(e.problem, path) from None
        raise


def save_config(config: IcotConfig, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
