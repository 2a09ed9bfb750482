"""What the causal-LM stages share: data loading, the starting model, batching and LM validation."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from icot.config import IcotConfig, TrainConfig
from icot.data import Example, read_examples
from icot.errors import ConfigError
from icot.evaluation import LMPredictor, evaluate
from icot.generation import context_length, left_pad, pad_right, shifted_positions
from icot.models.lm import build_gpt2, load_lm_dir, load_pretrained_lm, save_lm_dir
from icot.rundir import model_path
from icot.tokenizer import (
    IGNORE_INDEX,
    Encoded,
    Layout,
    answer_marker,
    build_bpe_tokenizer,
    build_word_tokenizer,
    load_tokenizer,
    set_answer_marker,
)
from icot.training.distributed import shard, sum_across
from icot.training.loop import Stage


def load_split(config: IcotConfig, split: str) -> list[Example]:
    """The examples of ``data.<split>``; training data honours ``data.max_train_examples``."""
    path = getattr(config.data, split)
    if not path:
        raise ConfigError(f"field 'data.{split}' is empty: give a data file")
    # Validation and test CoTs are never fed to a model at evaluation; GSM8K's validation file has a
    # few lines with an empty CoT (problems without calculator annotations), which must still count.
    examples = read_examples(path, allow_empty_cot=split != "train")
    if split == "train" and config.data.max_train_examples:
        examples = examples[: config.data.max_train_examples]
    return examples


def starting_lm(config: IcotConfig, train: Sequence[Example], init_from: str = ""
                ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model a stage starts from and its tokenizer.

    ``init_from`` (a stage or model directory) wins; otherwise ``model.name_or_path`` (any Hugging
    Face causal LM); otherwise a GPT-2 built from ``model`` with a vocabulary built from ``train``.
    """
    mc = config.model
    if init_from:
        model, tokenizer, _ = load_lm_dir(model_path(init_from))
        if answer_marker(tokenizer) != mc.answer_marker:
            raise ConfigError(f"field 'model.answer_marker': {mc.answer_marker!r}, but the model this stage starts "
                              f"from has the layout marker {answer_marker(tokenizer)!r}", init_from)
        return model, tokenizer
    tokenizer = starting_tokenizer(config, train)
    if mc.name_or_path:
        return load_pretrained_lm(mc.name_or_path, tokenizer), tokenizer
    return build_gpt2(mc, tokenizer), tokenizer


def starting_tokenizer(config: IcotConfig, train: Sequence[Example]) -> PreTrainedTokenizerBase:
    """The vocabulary of a model that does not start from a stage directory: the pretrained model's
    (``model.name_or_path``), or one built from ``train``; with the answer marker of ``model``."""
    mc = config.model
    if mc.name_or_path:
        tokenizer = load_tokenizer(mc.name_or_path)
        set_answer_marker(tokenizer, mc.answer_marker)
        return tokenizer
    if mc.tokenizer == "word":
        return build_word_tokenizer(train, mc.answer_marker)
    return build_bpe_tokenizer(train, mc.bpe_vocab_size, mc.answer_marker)


def check_fits(encoded: Sequence[Encoded], model: PreTrainedModel, path: str) -> None:
    """Refuse sequences longer than the model's context (nothing is ever truncated), naming the first offending
    line as ``FILE:LINE``."""
    check_lengths(encoded, context_length(model), path)


def check_lengths(encoded: Sequence[Encoded], limit: int | None, path: str) -> None:
    """:func:`check_fits` for a context length (None: unbounded) rather than a model.

    Raises:
        ConfigError: ``FILE:LINE: ...`` (1-based line of the first encoded sequence longer than ``limit``),
            with the longest sequence of the file, so that one run finds the ``model.n_positions`` it needs.
    """
    if limit is None:
        return
    for i, e in enumerate(encoded):
        if len(e.ids) > limit:
            longest = max(len(x.ids) for x in encoded)
            raise ConfigError(f"line {i + 1} is {len(e.ids)} tokens long, more than the model's context of {limit} "
                              f"(field model.n_positions; the longest line of this file is {longest} tokens); "
                              "lines are never truncated", path, i + 1)


def lm_batch(items: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Batch with labels only after the first ``<sep>`` (METHOD.md: the loss covers what follows it)."""
    ids, mask = pad_right([e.ids for e in items], pad_id)
    s1 = torch.tensor([e.s1 for e in items])
    s2 = torch.tensor([e.s2 for e in items])
    pos = torch.arange(ids.shape[1])[None, :]  # (1, T)
    labels = ids.masked_fill((pos <= s1[:, None]) | (mask == 0), IGNORE_INDEX)  # (B, T)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "s1": s1, "s2": s2}


def token_metrics(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed cross-entropy, correct-token count and token count of next-token predictions."""
    pred = logits[:, :-1].float()  # (B, T-1, V)
    gold = labels[:, 1:]  # (B, T-1)
    keep = gold != IGNORE_INDEX
    ce = nn.functional.cross_entropy(pred.transpose(1, 2), gold, ignore_index=IGNORE_INDEX, reduction="sum")
    correct = ((pred.argmax(-1) == gold) & keep).sum()
    return ce, correct, keep.sum()


class CausalLMStage(Stage):
    """Fine-tune a causal LM on the explicit (teacher) or no-CoT layout with answer-side loss."""

    shardable = True  # the module is the LM itself: FSDP may shard it

    def __init__(self, name: str, config: IcotConfig, train_cfg: TrainConfig, with_cot: bool,
                 init_from: str = "", meta: dict | None = None):
        self.name, self.config, self.with_cot = name, config, with_cot
        self.train_cfg = train_cfg
        train = load_split(config, "train")
        self.model, self.tokenizer = starting_lm(config, train, init_from or train_cfg.init_from)
        self.module = self.model
        self.layout = Layout(self.tokenizer)
        self.train_items = self.layout.encode_all(train, with_cot, config.data.train)
        check_fits(self.train_items, self.model, config.data.train)
        self.valid = load_split(config, "valid")
        self.valid_items = self.layout.encode_all(self.valid, with_cot, config.data.valid)
        check_fits(self.valid_items, self.model, config.data.valid)
        self.meta = {"layout": "explicit" if with_cot else "nocot", "stage": name, **(meta or {})}

    def collate(self, items: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        return lm_batch(items, self.layout.pad_id)

    def loss(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        out = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss, {}

    def validate(self, module: nn.Module) -> dict[str, float]:
        return validate_lm(module, self.layout, self.valid, self.valid_items, self.train_cfg, self.with_cot)

    def save(self, module: nn.Module, path: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        save_lm_dir(path, module, self.tokenizer, self.meta, self.config, state_dict=state_dict)


def chunks(items: Sequence, size: int) -> list[Sequence]:
    """Consecutive slices of ``size`` items."""
    return [items[i:i + size] for i in range(0, len(items), size)]


def teacher_forced_metrics(logits_of: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                           batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean answer-side cross-entropy, token accuracy and example count over batches carrying ``labels``.

    The batches are this process's shard; the sums are added across processes before dividing.
    """
    ce = correct = count = rows = 0.0
    for batch in batches:
        c, k, n = token_metrics(logits_of(batch), batch["labels"])
        ce, correct, count = ce + c.item(), correct + k.item(), count + n.item()
        rows += batch["labels"].shape[0]
    total = sum_across({"ce": ce, "correct": correct, "count": count, "rows": rows})
    return {"loss": total["ce"] / total["count"], "token_accuracy": total["correct"] / total["count"],
            "examples": total["rows"]}


def exact_match(correct: int, n: int) -> dict[str, float]:
    """Exact-match accuracy over all processes from this process's ``correct`` of ``n``."""
    total = sum_across({"correct": correct, "n": n})
    return {"accuracy": total["correct"] / total["n"], "exact_examples": total["n"]}


def validate_lm(model: PreTrainedModel, layout: Layout, valid: Sequence[Example], valid_items: Sequence[Encoded],
                cfg: TrainConfig, with_cot: bool, position_shift: int = 0) -> dict[str, float]:
    """Teacher-forced loss and token accuracy on the validation set, exact match on its first lines.

    ``position_shift`` moves every position from the first ``<sep>`` on (stepwise ``keep_position``).
    Each process scores its own shard of the lines (see :mod:`icot.training.distributed`).
    """
    device = next(model.parameters()).device
    mine = shard(valid_items)
    batches = (to_device(lm_batch(c, layout.pad_id), device) for c in chunks(mine, cfg.eval_batch_size))

    def logits_of(b: dict[str, torch.Tensor]) -> torch.Tensor:
        positions = shifted_positions(b["input_ids"].shape[1], b["s1"], position_shift) if position_shift else None
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=positions).logits

    metrics = teacher_forced_metrics(logits_of, batches)
    # The budget comes from all the lines, so that every process decodes as one process would.
    predictor = LMPredictor(model, layout, with_cot, max_new_tokens=answer_budget(valid_items[: cfg.eval_examples]),
                            position_shift=position_shift)
    head = shard(valid[: cfg.eval_examples])
    correct = evaluate(predictor, head, batch_size=cfg.eval_batch_size, progress=False,
                       warmup=False)["correct"] if head else 0
    return {**metrics, **exact_match(correct, len(head))}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move every tensor of a batch to ``device``."""
    return {k: v.to(device) for k, v in batch.items()}


def answer_budget(items: Sequence[Encoded]) -> int:
    """Decoding budget for validation: the longest reference continuation plus a margin.

    An untrained model that never emits ``<eos>`` then stops after a few extra steps instead of hundreds.
    """
    return max(len(e.ids) - e.s1 - 1 for e in items) + 8


def prompts_of(batch: dict[str, torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``INPUT <sep>`` of a right-padded no-CoT batch, left-padded for decoding: ``(ids, mask, s1)``.

    After left padding every prompt ends at the last column, so ``s1`` is that column for all rows.
    """
    device = batch["input_ids"].device
    rows = [row[: s + 1] for row, s in zip(batch["input_ids"].tolist(), batch["s1"].tolist())]
    ids, mask = left_pad(rows, pad_id, device)
    return ids, mask, torch.full((ids.shape[0],), ids.shape[1] - 1, device=device)
