"""Exact-match accuracy and throughput (examples/s), as the papers measure them.

A *predictor* turns a batch of INPUT strings into ``(cot, answer)`` pairs by greedy decoding; the
explicit-CoT teacher, the no-CoT model and the implicit model each provide one. Batches are
left-padded so that every row's prompt ends at the same position and ``generate`` decodes all rows
together (no Python loop over the batch); rows that finished early are cut at their ``<eos>``.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, StoppingCriteria, StoppingCriteriaList

from icot.data import Example
from icot.errors import DataFormatError
from icot.models.lm import context_length
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


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``(input_ids, attention_mask)``, both (B, T)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # building the batch, not the hot path
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


class StopAfterEos(StoppingCriteria):
    """Stop a row once it has generated ``count`` end-of-text tokens.

    The explicit layout uses the same token for ``<sep>`` and ``<eos>`` (as the papers do with GPT-2),
    so the teacher must stop at its second one, not its first.
    """

    def __init__(self, eos_id: int, count: int, prompt_length: int):
        self.eos_id, self.count, self.prompt_length = eos_id, count, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        generated = input_ids[:, self.prompt_length:]  # (B, t)
        return (generated == self.eos_id).sum(dim=1) >= self.count  # (B,)


def shifted_positions(width: int, s1: torch.Tensor, shift: int | torch.Tensor) -> torch.Tensor:
    """Position ids (B, width) of right-padded rows whose positions from ``s1`` on move right by ``shift``:
    the layout of a stepwise model trained with ``keep_position`` (the removed CoT tokens' positions stay
    taken, and the first ``<sep>`` moves up next to what is left, as the original code does).

    Args:
        width: columns.
        s1: (B,) position of the first ``<sep>``.
        shift: scalar or (B,) tokens removed after ``s1``.
    """
    pos = torch.arange(width, device=s1.device)[None, :]  # (1, T)
    return pos + (pos >= s1[:, None]) * torch.as_tensor(shift, device=s1.device).reshape(-1, 1)


@contextmanager
def positions_moved(model: PreTrainedModel, attention_mask: torch.Tensor, shift: int):
    """While ``generate`` runs on left-padded prompts ending in ``<sep>``, move every position from that
    ``<sep>`` on right by ``shift`` (see :func:`shifted_positions`).

    ``generate`` numbers the prompt's tokens ``cumsum(mask) - 1``, so a row's ``<sep>`` is at its token
    count - 1; a pre-hook moves the ``position_ids`` it passes to every forward (or, for a model whose
    ``generate`` passes none, numbers the forward's tokens the same way from its attention mask first).
    """
    sep = attention_mask.sum(1, keepdim=True) - 1  # (B, 1)

    def move(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        positions = kwargs.get("position_ids")
        if positions is None:
            ids, mask = kwargs["input_ids"], kwargs["attention_mask"]  # (B, t), (B, past + t)
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        kwargs["position_ids"] = positions + (positions >= sep) * shift
        return args, kwargs

    handle = model.register_forward_pre_hook(move, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def greedy_generate(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, layout: Layout,
                    n_eos: int, max_new_tokens: int, position_shift: int = 0) -> torch.Tensor:
    """Greedy decoding until ``n_eos`` end-of-text tokens per row; returns only the new tokens (B, t).

    The budget is capped so that prompt plus answer stay inside the model's context; ``position_shift``
    moves positions from the ``<sep>`` on (:func:`positions_moved`).
    """
    prompt_length = input_ids.shape[1]
    limit = context_length(model)
    if limit is not None:
        max_new_tokens = min(max_new_tokens, limit - prompt_length - position_shift)
    if max_new_tokens < 1:
        raise ValueError(f"a prompt of {prompt_length} tokens leaves no room to answer in a context of {limit}")
    # generate() fills every unset field from model.generation_config, whose eos_token_id would stop
    # the teacher at its first <sep>: stopping is StopAfterEos's job alone, so that field is blanked.
    config = copy.deepcopy(model.generation_config)
    config.update(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=layout.pad_id,
                  eos_token_id=None, bos_token_id=None)
    saved = model.generation_config
    model.generation_config = config
    try:
        stop = StoppingCriteriaList([StopAfterEos(layout.eos_id, n_eos, prompt_length)])
        with positions_moved(model, attention_mask, position_shift) if position_shift else nullcontext():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, stopping_criteria=stop)
    finally:
        model.generation_config = saved
    return out[:, prompt_length:]


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


def check_inputs(predictor: Predictor, inputs: Sequence[str], path: str | Path | None = None) -> None:
    """Refuse inputs the model cannot answer before decoding any: unknown symbols of a from-scratch
    vocabulary, and prompts that leave no room to answer in the model's context.

    Raises:
        DataFormatError: naming ``path`` (``<input>`` when None) and the 1-based line of the first bad input.
    """
    limit = getattr(predictor, "context", None)
    for line, text in enumerate(inputs, start=1):
        n = len(predictor.layout.prompt_ids(text, (None if path is None else str(path), line)))
        if limit is not None and n >= limit:
            raise DataFormatError(f"INPUT and <sep> are {n} tokens, which leaves no room to answer in the model's "
                                  f"context of {limit} (field n_positions)", path, line)


def normalize_answer(text: str) -> str:
    """Answers compare after whitespace normalisation only."""
    return " ".join(text.split())


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
        ``{"accuracy", "examples_per_second", "n", "correct", "batch_size", "seconds"}``.
    """
    if limit:
        examples = examples[:limit]
    if not examples:
        raise ValueError("no examples to evaluate")
    if warmup:
        predictor.predict([ex.input for ex in examples[:batch_size]])
    correct = 0
    start = time.perf_counter()
    bar = tqdm(total=len(examples), desc=f"eval bs={batch_size}", disable=not progress, leave=False)
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        preds = predictor.predict([ex.input for ex in chunk])
        correct += sum(normalize_answer(p.answer) == normalize_answer(ex.answer) for p, ex in zip(preds, chunk))
        bar.update(len(chunk))
    bar.close()
    seconds = time.perf_counter() - start
    n = len(examples)
    return {"accuracy": correct / n, "examples_per_second": n / seconds, "n": n, "correct": correct,
            "batch_size": batch_size, "seconds": seconds}


def predict_all(predictor: Predictor, inputs: Sequence[str], batch_size: int) -> list[Prediction]:
    """Predictions for many inputs, ``batch_size`` at a time."""
    out: list[Prediction] = []
    for i in range(0, len(inputs), batch_size):
        out.extend(predictor.predict(inputs[i:i + batch_size]))
    return out


def write_json(result: dict, path: str | Path) -> None:
    """Write an evaluation result as JSON."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


__all__ = ["Prediction", "Predictor", "LMPredictor", "evaluate", "predict_all", "left_pad", "greedy_generate",
           "StopAfterEos", "check_inputs", "normalize_answer", "write_json", "decode_device", "load_predictor"]


def decode_device(name: str = "auto") -> torch.device:
    """The device that ``eval.device`` names; ``auto`` is Accelerate's (a GPU when the process has one).

    Raises:
        ConfigError: for a name torch does not know or a device this machine lacks.
    """
    from icot.errors import ConfigError
    from icot.training.distributed import process_state

    if name == "auto":
        return process_state().device
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"field 'eval.device' is '{name}', which is not a torch device (auto, cpu, cuda, cuda:1, "
                          "mps, ...)") from None
    if device.type == "meta":
        raise ConfigError(f"field 'eval.device' is '{name}': a meta tensor holds no values to decode with")
    try:  # a CUDA build without a GPU, a GPU index past the last, a backend torch was built without
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        reason = str(e).strip().split(". ")[0] or type(e).__name__
        raise ConfigError(f"field 'eval.device' is '{name}', which torch cannot use here: {reason}") from None
    return device


def load_predictor(path: str, max_new_tokens: int = 256, device: str = "auto", dtype: str = "float32") -> Predictor:
    """The predictor of a model or stage directory: a causal LM (explicit or no-CoT) or an implicit model.

    Args:
        path: a model directory, or a stage directory (its best model, else its final one).
        max_new_tokens: decoding budget per example.
        device: where to decode (:func:`decode_device`).
        dtype: the weights' dtype while decoding (``float32``, ``bfloat16``, ``float16``).
    """
    from icot.errors import CheckpointError
    from icot.models.lm import load_lm_dir, read_meta
    from icot.training.loop import model_path

    directory = model_path(path)
    meta = read_meta(directory)
    place = {"device": decode_device(device), "dtype": getattr(torch, dtype)}
    if meta["kind"] == "lm":
        model, tokenizer, meta = load_lm_dir(directory)
        model.to(**place).eval()
        return LMPredictor(model, Layout(tokenizer), meta.get("layout") == "explicit", max_new_tokens,
                           meta.get("position_shift", 0))
    if meta["kind"] == "implicit":
        from icot.models.implicit import ImplicitModel, ImplicitPredictor

        model = ImplicitModel.from_pretrained(directory)
        model.to(**place).eval()
        return ImplicitPredictor(model, max_new_tokens)
    raise CheckpointError(f"field 'kind' is '{meta['kind']}': only 'lm' and 'implicit' models answer questions",
                          directory)
