"""Typed configuration: dataclasses with defaults and range checks, YAML files, ``--section.key value`` flags.

One :class:`IcotConfig` describes a whole run; each stage reads the sections it needs (``data``,
``model`` and its own training section). The resolved config is written beside every checkpoint
(``config.yaml``) so that a run can be reproduced and a finished stage recognised.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import types
import typing
from argparse import ArgumentError
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import ArgumentParser

from icot.devices import process_state, resolve_mixed_precision
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
    tokenizer: Literal["word", "bpe"] = "word"
    bpe_vocab_size: int = 2000
    answer_marker: str = ""

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_embd", "n_head", "n_positions"):
            _check(getattr(self, name) > 0, f"model.{name}", "must be > 0")
        _check(self.n_embd % self.n_head == 0, "model.n_embd", "must be divisible by model.n_head")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        _check(self.bpe_vocab_size >= 300, "model.bpe_vocab_size", "must be >= 300 (256 bytes + specials)")


@dataclass
class TrainConfig:
    """One training stage on the shared loop.

    Attributes:
        epochs: passes over the training data (fractions allowed).
        max_steps: stop after this many optimizer steps (0: no limit besides epochs).
        max_minutes: stop after this much wall time (0: no limit); validation runs before stopping.
        patience: stop once this many validations in a row have not improved the kept model (0: never):
            train a stage until its validation score stops rising (the emulator's state error, say)
            instead of guessing its budget. Validations not yet eligible for keeping do not count.
        keep_best_by: what keep-best (and so patience) ranks validations by: ``accuracy``, the exact match on
            ``eval_examples`` lines with the validation loss breaking ties, or ``loss``, the validation loss
            alone. Near 0% one line of ``eval_examples`` moves exact match by ``1 / eval_examples`` and decides
            the kept model against any loss (kd-4x4's couple stage kept step 4,500 at 0.5% of 200 lines over
            step 8,000's lower loss at 0%); ``loss`` ranks such a stage by what still moves. The emulator
            stage reports no exact match, so it is ranked by its loss either way.
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
        mixed_precision: ``no``, ``fp16``, ``bf16`` (passed to Accelerate) or ``auto``: bf16 where the device
            runs it natively, else ``no`` (:func:`icot.devices.resolve_mixed_precision`). On a CPU with AVX512_BF16
            bf16 autocast trains a 2-layer 768-wide GPT-2 2.5x faster than fp32 (benchmarks/train_speed.py); on
            one without it, torch emulates bf16 and a step is 10x slower or worse.
        compile: compile the training forward with ``torch.compile`` (inductor, dynamic shapes) through
            Accelerate; 1.3-1.5x per step on a Zen 4 CPU after a compilation of 20-40 s; in fp32 on one thread of
            an AVX2 EPYC, 12 layers of 128 dims: 1.21x (teacher), 1.18x (no-CoT), 1.35x (mind-reading student)
            after 1-3 minutes of compilation. It may be switched on or off when a run resumes.
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
    patience: int = 0
    keep_best_by: Literal["accuracy", "loss"] = "accuracy"
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 500
    eval_examples: int = 200
    eval_batch_size: int = 128
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = "no"
    compile: bool = False
    init_from: str = ""
    log_every: int = 50
    save_every: int = 0
    log_with: Literal["", "tensorboard", "wandb", "mlflow"] = ""  # Accelerate's tracker names ("": none)

    def check(self, section: str) -> None:
        """Range checks, naming the fields ``SECTION.FIELD`` (run by :class:`IcotConfig` for each section)."""
        _check(0 < self.epochs < math.inf, f"{section}.epochs", "must be > 0 and finite")
        _check(self.max_steps >= 0, f"{section}.max_steps", "must be >= 0")
        _check(self.max_minutes >= 0, f"{section}.max_minutes", "must be >= 0")
        _check(self.patience >= 0, f"{section}.patience", "must be >= 0")
        _check(self.batch_size > 0, f"{section}.batch_size", "must be > 0")
        _check(self.grad_accum > 0, f"{section}.grad_accum", "must be > 0")
        _check(self.batch_size % self.grad_accum == 0, f"{section}.batch_size",
               "must be divisible by grad_accum")
        _check(0 < self.lr < 1, f"{section}.lr", "must be in (0, 1)")
        _check(self.weight_decay >= 0, f"{section}.weight_decay", "must be >= 0")
        _check(self.warmup_steps >= 0, f"{section}.warmup_steps", "must be >= 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"{section}.min_lr_ratio", "must be in [0, 1]")
        _check(self.max_grad_norm > 0, f"{section}.max_grad_norm", "must be > 0")
        _check(self.eval_every >= 0, f"{section}.eval_every", "must be >= 0")
        _check(self.eval_examples > 0, f"{section}.eval_examples", "must be > 0")
        _check(self.eval_batch_size > 0, f"{section}.eval_batch_size", "must be > 0")
        _check(self.log_every > 0, f"{section}.log_every", "must be > 0")
        _check(self.save_every >= 0, f"{section}.save_every", "must be >= 0")


Subset = Literal["diagonal", "first_column", "last_column", "top_row", "bottom_row"]
SUBSETS: tuple[str, ...] = typing.get_args(Subset)


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

    subset: Subset = "diagonal"
    delta: int | Literal["dynamic"] = "dynamic"
    init_from_teacher: bool = True
    mixture_size: int = 1
    mixture_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        _check(self.delta == "dynamic" or self.delta > 0, "kd.delta", "must be 'dynamic' or a positive integer")
        _check(self.mixture_size >= 1, "kd.mixture_size", "must be >= 1")
        _check(self.mixture_loss_weight >= 0, "kd.mixture_loss_weight", "must be >= 0")


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
        advance_at: ours, 0 = off: a validation whose exact match (0-1, in the format of the moment)
            reaches this removes the next token at once, instead of at the end of the token's
            ``round(E / r)`` steps; the later tokens keep that pace from there. The fixed schedule stays
            the slowest a token can go, so easy tokens cost less and hard ones as much as before. Needs
            ``stepwise.eval_every``, which is then the gate's resolution.
        min_steps_per_token: with ``advance_at``, the steps a token gets at least before the gate may
            remove the next one.
    """

    remove_per_epoch: int = 8
    steps_per_epoch: int = 0
    removal_smoothing_lambda: float = 4.0
    remove_all_when_remove_beyond: int = 0
    reset_optimizer: bool = True
    reset_warmup_steps: int = 0
    keep_position: bool = False
    from_teacher: bool = True
    advance_at: float = 0.0
    min_steps_per_token: int = 0

    def __post_init__(self) -> None:
        _check(self.remove_per_epoch > 0, "si.remove_per_epoch", "must be > 0")
        _check(0.0 <= self.advance_at <= 1.0, "si.advance_at", "must be in [0, 1] (0: off)")
        _check(self.min_steps_per_token >= 0, "si.min_steps_per_token", "must be >= 0")
        _check(self.steps_per_epoch >= 0, "si.steps_per_epoch", "must be >= 0")
        _check(self.removal_smoothing_lambda > 0, "si.removal_smoothing_lambda", "must be > 0 (.inf: no smoothing)")
        _check(self.remove_all_when_remove_beyond >= 0, "si.remove_all_when_remove_beyond", "must be >= 0")
        _check(self.reset_warmup_steps >= 0, "si.reset_warmup_steps", "must be >= 0")


EvalDtype = Literal["float32", "bfloat16", "float16"]
EVAL_DTYPES: tuple[str, ...] = typing.get_args(EvalDtype)


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
    dtype: EvalDtype = "float32"
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


def _check_choices(node: Any, prefix: str) -> None:
    """Every ``Literal`` field of ``node`` and its sections holds one of its choices (the loader checks what it
    reads; this catches a config built or changed in code, e.g. with ``dataclasses.replace``)."""
    for name, tp in typing.get_type_hints(type(node)).items():
        value, key = getattr(node, name), f"{prefix}{name}"
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{key}.")
            continue
        tp, values = (typing.get_args(tp)[0], value) if typing.get_origin(tp) is list else (tp, [value])
        if typing.get_origin(tp) is not Literal:  # incl. int | Literal['dynamic'] (kd.delta checks itself)
            continue
        allowed = typing.get_args(tp)
        for v in values:
            _check(v in allowed, key, "must be one of " + ", ".join(map(repr, allowed)) + f", got {v!r}")


Method = Literal["nocot", "explicit", "icot-kd", "icot-si"]
METHODS: tuple[str, ...] = typing.get_args(Method)


@dataclass
class IcotConfig:
    """A whole run: data, model, one training section per stage, and evaluation.

    Building one range-checks each training section under its own name (``field 'couple.lr': ...``).
    """

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
    methods: list[Method] = field(default_factory=lambda: list(METHODS))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if isinstance(section := getattr(self, f.name), TrainConfig):
                section.check(f.name)
        _check_choices(self, "")

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
    back (tuples as lists), with the training and validation files as absolute paths and each
    ``mixed_precision`` as it resolves on this process's device (``auto`` is bf16 or no)."""
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
            if key == "mixed_precision":  # what the stage trains with on this device: ``auto`` resolved
                value = resolve_mixed_precision(value, process_state().device)[0]
            flat[f"{name}.{key}"] = value
    return json.loads(json.dumps(flat))


# ---------------------------------------------------------------------------------------------
# Loading from YAML and flags: jsonargparse reads the flags and checks every value against its field's type.


@functools.cache
def _parser() -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False, allow_abbrev=False, add_help=False)
    parser.add_class_arguments(IcotConfig)
    return parser


def _not_none(tp: Any) -> Any:
    """``X`` for ``X | None``, else ``tp``."""
    args = typing.get_args(tp)
    return next(a for a in args if a is not type(None)) if type(None) in args else tp


def _field_type(key: str) -> Any:
    """The annotated type of the field ``key`` (``"teacher.lr"``).

    Raises:
        ConfigError: for an unknown field, naming the known ones.
    """
    tp, path = IcotConfig, []
    for part in key.split("."):
        hints = typing.get_type_hints(_not_none(tp)) if dataclasses.is_dataclass(_not_none(tp)) else {}
        path.append(part)
        if part not in hints:
            raise ConfigError(f"unknown field '{'.'.join(path)}' (known: {', '.join(sorted(hints))})")
        tp = hints[part]
    return tp


def _expected(tp: Any) -> str:
    """``tp`` in words: ``an integer``, ``one of 'no', 'fp16', 'bf16'``, ``a list of ...``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(repr, args))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(map(_expected, args))
    if typing.get_origin(tp) is list:
        return f"a list, each {_expected(args[0])}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return names.get(tp, "a mapping")


def _problem(error: ArgumentError) -> str:
    """jsonargparse's (often multi-line) error as one line: ``field 'KEY': expected ..., got VALUE``."""
    message = str(error)
    found = re.search(r'Parser key "([\w.]+)"|unrecognized arguments: --([\w.]+)|argument --([\w.]+): expected one',
                      message)
    if not found:
        return " ".join(message.split())
    key = next(g for g in found.groups() if g)
    tp = _field_type(key)  # an unknown field raises here
    if found.group(3):
        return f"override '--{key}': missing value (write --{key}=VALUE for a value that starts with '-')"
    got = re.search(r"(?:Got|Given) value: (.*)\Z", message, re.S)
    verb = "must be" if typing.get_origin(tp) is Literal else "expected"
    return f"field '{key}': {verb} {_expected(tp)}" + (f", got {got.group(1).strip()}" if got else "")


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


def _read_yaml(path: str | Path) -> dict[str, Any]:
    """``yaml.safe_load`` in its two steps, one parse: compose the nodes, refuse a repeated key, construct."""
    try:
        loader = yaml.SafeLoader(Path(path).read_text(encoding="utf-8"))
        try:
            node = loader.get_single_node()
            _refuse_duplicate_keys(node)
            data = None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:  # one line: the problem and where, without PyYAML's excerpt
        where = f" (line {e.problem_mark.line + 1})" if e.problem_mark and "line" not in str(e.problem) else ""
        raise ConfigError(f"cannot read config: {e.problem}{where}", path) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config: {e}", path) from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping of sections", path)
    return data or {}


def _check_dict(data: dict[str, Any], prefix: str = "", in_optional: bool = False) -> None:
    """Refuse what jsonargparse lets through from a dict, or reports badly: a null for a field that cannot be
    None, a section that is not a mapping, and a wrong scalar inside a section that may be null (jsonargparse
    names only the section there: "expected a mapping or null")."""
    for name, value in data.items():
        key = f"{prefix}{name}"
        tp = _field_type(key)
        null_for_required = value is None and _not_none(tp) is tp
        section_not_mapping = dataclasses.is_dataclass(tp) and not isinstance(value, dict)
        wrong_scalar = in_optional and value is not None and not _scalar_fits(_not_none(tp), value)
        if null_for_required or section_not_mapping or wrong_scalar:
            raise ConfigError(f"field '{key}': expected {_expected(tp)}, got {value!r}")
        if dataclasses.is_dataclass(_not_none(tp)) and isinstance(value, dict):
            _check_dict(value, f"{key}.", in_optional or _not_none(tp) is not tp)


def _scalar_fits(tp: Any, value: Any) -> bool:
    """Whether ``value`` is one of ``tp`` when ``tp`` is int, float or bool (an int is a float; a bool is
    neither an int nor a float); other types are left to jsonargparse."""
    if tp not in (int, float, bool):
        return True
    if isinstance(value, bool):
        return tp is bool
    return isinstance(value, tp) or tp is float and isinstance(value, int)


def _in_optional_section(key: str) -> bool:
    """Whether ``key`` lies inside a section that may be null (``data.generate.train_count``)."""
    parts = key.split(".")
    for end in range(1, len(parts)):
        tp = _field_type(".".join(parts[:end]))
        if _not_none(tp) is not tp and dataclasses.is_dataclass(_not_none(tp)):
            return True
    return False


def _optional_section_flags(flags: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``(nested dict, other flags)``: the flags (field names already with ``_``) inside a section that may
    be null, as a dict override.

    jsonargparse parses such a flag over a section set by the YAML into a half-built value that no longer
    instantiates; a dict override merges into the section instead. Values are read as YAML, except for
    string fields, which keep them as typed (as jsonargparse does for flags).
    """
    nested: dict[str, Any] = {}
    rest: list[str] = []
    i = 0
    while i < len(flags):
        flag = flags[i]
        key, has_value, value = flag[2:].partition("=") if flag.startswith("--") else ("", False, "")
        if not key or not _in_optional_section(key) or (not has_value and i + 1 >= len(flags)):
            rest.append(flag)
            i += 1
            continue
        if not has_value:
            value, i = flags[i + 1], i + 1
        i += 1
        if _not_none(_field_type(key)) is not str:  # a wrong value is named by _check_dict, as for a YAML file
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"override '--{key}': cannot read {value!r}") from None
        node = nested
        *sections, leaf = key.split(".")
        for name in sections:
            node = node.setdefault(name, {})
        node[leaf] = value
    return nested, rest


def _parse(data: dict[str, Any], overrides: list[str] | dict | None) -> IcotConfig:
    _check_dict(data)
    if isinstance(overrides, dict):
        merged, flags = overrides, []
    else:
        flags = [re.sub(r"^--([^=]*)", lambda m: "--" + m[1].replace("-", "_"), flag) for flag in overrides or []]
        merged, flags = _optional_section_flags(flags)
    _check_dict(merged)
    parser = _parser()
    try:
        namespace = parser.parse_object(data)
        if merged:
            namespace = parser.parse_object(merged, namespace=namespace)
        if flags:
            namespace = parser.parse_args(flags, namespace=namespace)
        return IcotConfig(**vars(parser.instantiate(namespace)))
    except ArgumentError as e:
        raise ConfigError(_problem(e)) from None
    except ValueError as e:  # a range check; jsonargparse wraps those of data.generate (an Optional)
        if isinstance(e.__cause__, ConfigError):
            raise e.__cause__ from None
        raise


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> IcotConfig:
    """Read a YAML config (or defaults when ``path`` is None) and apply overrides.

    ``overrides`` is a nested dict or flags, ``["--teacher.lr", "1e-3", "--data.test=f.txt"]`` (``-`` or ``_``
    in the field name); a flag's value is read as YAML except for string fields, which keep it as typed.

    Raises:
        ConfigError: naming the file and the field for unknown fields, wrong types and bad ranges.
    """
    try:
        return _parse({} if path is None else _read_yaml(path), overrides)
    except ConfigError as e:
        raise ConfigError(e.problem, e.path or path) from None


def save_config(config: IcotConfig, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
