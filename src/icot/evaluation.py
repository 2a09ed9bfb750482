"""Exact-match accuracy and throughput (examples/s), as the papers measure them.

A *predictor* turns a batch of INPUT strings into ``(cot, answer)`` pairs by greedy decoding; the
explicit-CoT teacher, the no-CoT model and the implicit model each provide one. Batches are
left-padded so that every row's prompt ends at the same position and ``generate`` decodes all rows
together (no Python loop over the batch); rows that finished early are cut at their ``<eos>``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Context, Decimal
from pathlib import Path
from typing import Protocol

import torch
from transformers import PreTrainedModel

from icot.config import load_config
from icot.data import Example, parse_line, read_inputs
from icot.data.multiplication import generate_examples
from icot.devices import decode_device
from icot.errors import CheckpointError, DataFormatError
from icot.generation import context_length, greedy_generate, left_pad
from icot.models.implicit import ImplicitModel
from icot.models.lm import load_lm_dir, save_lm_dir
from icot.progress import progress_bar
from icot.rundir import model_path, read_meta
from icot.tokenizer import Layout


@dataclass
class Prediction:
    """What a model produced for one input: the CoT text (empty without CoT) and the answer."""

    cot: str
    answer: str


class Predictor(Protocol):
    """Anything that answers a batch of inputs (a ``context`` attribute, when present, bounds prompt + answer)."""

    layout: Layout

    def predict(self, inputs: Sequence[str]) -> list[Prediction]: ...


class LMPredictor:
    """Greedy answers of a plain causal LM: the explicit-CoT teacher, the no-CoT or the stepwise model."""

    def __init__(self, model: PreTrainedModel, layout: Layout, with_cot: bool, max_new_tokens: int = 256,
                 position_shift: int = 0):
        self.model, self.layout, self.with_cot, self.max_new_tokens = model, layout, with_cot, max_new_tokens
        self.position_shift = position_shift  # a keep_position stepwise model's (its meta says)
        self.context = context_length(model)
        if self.context is not None:
            self.context -= position_shift

    @torch.no_grad()
    def predict(self, inputs: Sequence[str]) -> list[Prediction]:
        """Decode a batch of inputs."""
        device = next(self.model.parameters()).device
        ids, mask = left_pad([self.layout.prompt_ids(x) for x in inputs], self.layout.pad_id, device)
        new = greedy_generate(self.model, ids, mask, self.layout, 2 if self.with_cot else 1, self.max_new_tokens,
                              self.position_shift)
        return [Prediction(*self.layout.split_generation(row, self.with_cot)) for row in new.tolist()]


class ImplicitPredictor:
    """Greedy answers of an :class:`ImplicitModel` (the :class:`~icot.evaluation.Predictor` protocol).

    Args:
        model: an implicit model whose ``tokenizer`` is set (as :meth:`ImplicitModel.from_pretrained` does).
        max_new_tokens: decoding budget per example.
    """

    with_cot = False  # its layout is INPUT <sep> [MARKER] ANSWER <eos>: no CoT is ever shown or produced

    def __init__(self, model: ImplicitModel, max_new_tokens: int = 256):
        if model.tokenizer is None:
            raise ValueError("ImplicitModel.tokenizer is not set: load the model with ImplicitModel.from_pretrained "
                             "or assign model.tokenizer")
        self.model, self.max_new_tokens = model, max_new_tokens
        self.layout = Layout(model.tokenizer)
        limits = [n for n in (context_length(model.emulator.lm), context_length(model.student.lm)) if n is not None]
        self.context = min(limits) if limits else None

    @torch.no_grad()
    def predict(self, inputs: Sequence[str]) -> list[Prediction]:
        """Decode a batch of inputs; the CoT of every prediction is empty (the model produces none)."""
        device = next(self.model.parameters()).device
        ids, mask = left_pad([self.layout.prompt_ids(x) for x in inputs], self.layout.pad_id, device)  # (B, T)
        # Left padding puts every row's <sep> in the last column.
        s1 = torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=device)  # (B,)
        new = self.model.generate(ids, mask, s1, self.layout, self.max_new_tokens)  # (B, t)
        return [Prediction("", answer) for answer in self.layout.answers(new)]


def check_inputs(predictor: Predictor, inputs: Sequence[str], path: str | Path | None = None) -> None:
    """Refuse inputs the model cannot answer before decoding any: unknown symbols of a from-scratch
    vocabulary, and prompts that leave no room to answer in the model's context.

    Raises:
        DataFormatError: naming ``path`` (``<input>`` when None) and the 1-based line of the first bad input.
    """
    check_prompts(predictor.layout, getattr(predictor, "context", None), inputs, path)


def check_prompts(layout: Layout, context: int | None, inputs: Sequence[str], path: str | Path | None = None) -> None:
    """:func:`check_inputs` for a layout and a context length (None: unbounded) rather than a predictor."""
    for line, text in enumerate(inputs, start=1):
        n = len(layout.prompt_ids(text, (None if path is None else str(path), line)))
        if context is not None and n >= context:
            raise DataFormatError(f"INPUT and <sep> are {n} tokens, which leaves no room to answer in the model's "
                                  f"context of {context} (field n_positions)", path, line)


# A number as GSM8K writes answers: optional sign, digits with or without thousands commas (in groups of
# three), an optional decimal part ("5", "-3", "1,000", "2.50", ".5", "5."). Nothing else (no spaces, so a
# multiplication answer "1 3 9 4" is never a number; no exponent, no "$" or units).
_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d*)?")


def numeric_value(text: str) -> Decimal | None:
    """The value of an answer that is one number (see ``_NUMBER``), exactly (``decimal.Decimal``), else None."""
    text = text.strip()
    if not _NUMBER.fullmatch(text) or not any(c.isdigit() for c in text):
        return None
    return Decimal(text.replace(",", ""))


def normalize_answer(text: str) -> str:
    """The form answers compare in: a number's canonical value (``"1,000"``, ``"1000.0"`` and ``"+1000"`` all
    give ``"1000"``, ``"-0"`` gives ``"0"``), anything else with its whitespace normalised (so multiplication
    answers ``"1 3 9 4"`` compare as text)."""
    value = numeric_value(text)
    if value is None:
        return " ".join(text.split())
    if value == 0:
        return "0"
    # normalize() drops trailing zeros (exactly, given enough precision for every digit) but may give an
    # exponent ("1E+3"); format as plain fixed-point.
    return format(value.normalize(Context(prec=len(text) + 1)), "f")


def answers_match(predicted: str, reference: str) -> bool:
    """Exact match: equal as numbers when both are numbers (``"1,000" == "1000"``, ``"5.0" == "5"``), else equal
    as text after whitespace normalisation."""
    return normalize_answer(predicted) == normalize_answer(reference)


def evaluate(predictor: Predictor, examples: Sequence[Example], batch_size: int = 1, limit: int = 0,
             progress: bool = True, warmup: bool = True) -> dict:
    """Exact-match accuracy and examples/s over ``examples``.

    Args:
        predictor: the model to evaluate.
        examples: test examples (their CoT is never shown to the predictor).
        batch_size: examples decoded together; the papers report batch size 1.
        limit: evaluate the first N examples (0: all).
        progress: show a progress bar.
        warmup: decode one untimed batch first, so one-time start-up costs do not count as speed.

    Returns:
        ``{"accuracy", "examples_per_second", "n", "correct", "batch_size", "seconds", "digit_accuracy"}``;
        ``digit_accuracy`` is :func:`digit_accuracy` of the predictions.
    """
    if limit:
        examples = examples[:limit]
    if not examples:
        raise ValueError("no examples to evaluate")
    if warmup:
        predictor.predict([ex.input for ex in examples[:batch_size]])
    answers: list[str] = []
    start = time.perf_counter()
    bar = progress_bar(len(examples), f"eval bs={batch_size}", enabled=progress, leave=False)
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        preds = predictor.predict([ex.input for ex in chunk])
        if len(preds) != len(chunk):
            raise RuntimeError(f"the predictor answered {len(preds)} of a batch of {len(chunk)} inputs")
        answers += [p.answer for p in preds]
        bar.update(len(chunk))
    bar.close()
    seconds = time.perf_counter() - start
    n = len(examples)
    correct = sum(answers_match(a, ex.answer) for a, ex in zip(answers, examples))
    return {"accuracy": correct / n, "examples_per_second": n / seconds, "n": n, "correct": correct,
            "batch_size": batch_size, "seconds": seconds,
            "digit_accuracy": digit_accuracy(answers, [ex.answer for ex in examples])}


def digit_accuracy(predicted: Sequence[str], references: Sequence[str]) -> list[float]:
    """Accuracy of each answer token (whitespace-separated) by its place: for the papers' multiplication
    answers, of each digit, least significant first. A missing predicted token counts as wrong; place
    ``k`` is scored over the references that have one (all of them when answers have one length).

    Args:
        predicted: predicted answer texts.
        references: the reference answers, one per prediction.

    Returns:
        One accuracy per place, up to the longest reference.
    """
    correct: list[int] = []
    count: list[int] = []
    for pred, ref in zip(predicted, references, strict=True):
        got, want = pred.split(), ref.split()
        for k, token in enumerate(want):
            if k == len(count):
                correct.append(0)
                count.append(0)
            count[k] += 1
            correct[k] += k < len(got) and got[k] == token
    return [c / n for c, n in zip(correct, count)]


def evaluate_sizes(predictor: Predictor, sizes: Sequence[tuple[int, int]], count: int, seed: int = 0,
                   batch_size: int = 1, exclude: Sequence[str | Path] = (), progress: bool = True) -> list[dict]:
    """Exact match on multiplication problems of other operand sizes than trained (out of distribution).

    Each size gets ``count`` distinct generated lines (``seed``; the INPUTs of ``exclude`` files never
    appear, so the trained size can be scored on unseen problems). A size whose prompts do not fit the
    model's context, or that has fewer than ``count`` distinct problems left, is reported with its
    ``error`` instead of an accuracy.

    Returns:
        One row per size: ``{"size": "NxM", "digits_a", "digits_b", "n", "accuracy", "correct",
        "examples_per_second", "batch_size"}`` or ``{"size", "digits_a", "digits_b", "error"}``.
    """
    excluded = [text for path in exclude for text in read_inputs(path)]
    rows = []
    for a, b in sizes:
        row = {"size": f"{a}x{b}", "digits_a": a, "digits_b": b}
        try:  # too few distinct problems of this size (1x1 has 81), or prompts the context cannot hold
            examples = [parse_line(line) for line in generate_examples(a, b, count, seed, excluded)]
            check_inputs(predictor, [ex.input for ex in examples], f"<{a}x{b} problems>")
        except DataFormatError as e:
            rows.append({**row, "error": e.problem})
            continue
        except ValueError as e:
            rows.append({**row, "error": str(e)})
            continue
        result = evaluate(predictor, examples, batch_size=batch_size, progress=progress)
        rows.append({**row, **{k: result[k] for k in ("n", "accuracy", "correct", "examples_per_second", "batch_size")}})
    return rows


def write_json(result: dict, path: str | Path) -> None:
    """Write an evaluation result as JSON."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


__all__ = ["Prediction", "Predictor", "LMPredictor", "ImplicitPredictor", "evaluate", "check_inputs", "check_prompts",
           "normalize_answer", "answers_match", "numeric_value", "write_json", "load_predictor", "evaluate_sizes",
           "export_model", "digit_accuracy"]


def export_model(path: str, out: str | Path, dtype: str = "bfloat16") -> Path:
    """Write the model of ``path`` (a model or stage directory) to ``out`` with weights in ``dtype``.

    The copy answers like the original loaded in that dtype (``icot eval --dtype``); bf16 halves the
    size of a committed or shared model. ``icot.json`` (layout, position shift) and the config go along.

    Raises:
        CheckpointError: when ``path`` holds no answering model, or ``out`` is ``path`` itself.
    """
    directory, out = model_path(path), Path(out)
    if out.resolve() == directory.resolve():
        raise CheckpointError("the export would overwrite the model it reads; give another --out", out)
    meta = read_meta(directory)
    config = load_config(directory / "config.yaml") if (directory / "config.yaml").is_file() else None
    if meta["kind"] == "lm":
        model, tokenizer, meta = load_lm_dir(directory, dtype=getattr(torch, dtype))
        save_lm_dir(out, model, tokenizer, {k: v for k, v in meta.items() if k != "kind"}, config)
    elif meta["kind"] == "implicit":
        model = ImplicitModel.from_pretrained(directory).to(getattr(torch, dtype))
        model.save_pretrained(out, model.tokenizer, config)
    else:
        raise CheckpointError(f"field 'kind' is '{meta['kind']}': only 'lm' and 'implicit' models answer questions",
                              directory)
    return out


def load_predictor(path: str, max_new_tokens: int = 256, device: str = "auto", dtype: str = "float32") -> Predictor:
    """The predictor of a model or stage directory: a causal LM (explicit or no-CoT) or an implicit model.

    Args:
        path: a model directory, or a stage directory (its best model, else its final one).
        max_new_tokens: decoding budget per example.
        device: where to decode (:func:`decode_device`).
        dtype: the weights' dtype while decoding (``float32``, ``bfloat16``, ``float16``).
    """
    directory = model_path(path)
    meta = read_meta(directory)
    place = {"device": decode_device(device), "dtype": getattr(torch, dtype)}
    if meta["kind"] == "lm":
        model, tokenizer, meta = load_lm_dir(directory)
        model.to(**place).eval()
        return LMPredictor(model, Layout(tokenizer), meta.get("layout") == "explicit", max_new_tokens,
                           meta.get("position_shift", 0))
    if meta["kind"] == "implicit":
        model = ImplicitModel.from_pretrained(directory)
        model.to(**place).eval()
        return ImplicitPredictor(model, max_new_tokens)
    raise CheckpointError(f"field 'kind' is '{meta['kind']}': only 'lm' and 'implicit' models answer questions",
                          directory)
