"""Vocabularies and the token layout of METHOD.md.

From-scratch models get a vocabulary built from their training data with the ``tokenizers`` library:
word-level over whitespace-separated symbols (multiplication) or byte-level BPE (natural language).
Pretrained models keep their own tokenizer. Either way the result is a
``PreTrainedTokenizerFast`` saved beside the model.

Layout: ``INPUT <sep> COT <sep> ANSWER <eos>`` (explicit) or ``INPUT <sep> ANSWER <eos>`` (no CoT),
where ``<sep>`` and ``<eos>`` are the end-of-text token as in the papers; the loss covers only what
follows the first ``<sep>``. An optional answer marker (``model.answer_marker``, the papers' ``####``)
stands right before ANSWER in every layout: a few constant positions the model computes in before its
first answer token. It is saved in the tokenizer's config, so every model keeps its own layout.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from icot.data import Example
from icot.errors import CheckpointError, DataFormatError

# Examples per batched tokenizer call in Layout.encode_all: the Rust tokenizer's encodings of a whole file (tokens,
# offsets and masks per token) took 15 GB at their peak for 1.6M 5x5 lines; chunks keep the peak near the ids'.
ENCODE_CHUNK = 20_000

EOS = "<|endoftext|>"
PAD = "<pad>"
UNK = "<unk>"
IGNORE_INDEX = -100
# tokenizer_config.json key of the answer marker: the layout travels with the vocabulary.
ANSWER_MARKER = "icot_answer_marker"


def answer_marker(tokenizer: PreTrainedTokenizerBase) -> str:
    """The answer marker of a tokenizer's layout ("" when none)."""
    return tokenizer.init_kwargs.get(ANSWER_MARKER, "")


def set_answer_marker(tokenizer: PreTrainedTokenizerBase, marker: str) -> None:
    """Give a (pretrained) tokenizer's layout an answer marker; ``save_pretrained`` keeps it."""
    tokenizer.init_kwargs[ANSWER_MARKER] = marker


def _wrap(tok: Tokenizer, marker: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD, unk_token=UNK,
        clean_up_tokenization_spaces=False, model_max_length=1_000_000, **{ANSWER_MARKER: marker},
    )


def build_word_tokenizer(examples: Iterable[Example], marker: str = "") -> PreTrainedTokenizerFast:
    """Word-level vocabulary over whitespace-separated symbols (digits, ``*``, ``+``, parentheses) and
    the answer ``marker``'s symbols."""
    symbols: set[str] = set(marker.split())
    for ex in examples:
        for part in (ex.input, ex.cot, ex.answer):
            symbols.update(part.split())
    vocab = {s: i for i, s in enumerate([EOS, PAD, UNK] + sorted(symbols - {EOS, PAD, UNK}))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No decoder: the backend joins word-level tokens with single spaces, which is the data format.
    return _wrap(tok, marker)


def build_bpe_tokenizer(examples: Iterable[Example], vocab_size: int, marker: str = "") -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style) trained on the examples' text (and the answer ``marker``)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    texts = (part for ex in examples for part in (ex.input, ex.cot, ex.answer))
    tok.train_from_iterator(itertools.chain([marker], texts), trainer=trainer)
    return _wrap(tok, marker)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A saved or pretrained tokenizer; a missing pad token becomes the end-of-text token (GPT-2).

    Raises:
        CheckpointError: naming ``path`` when the tokenizer files are missing or unreadable.
    """
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # the Rust tokenizers library raises plain Exceptions on malformed files
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise CheckpointError(f"cannot load the tokenizer: {type(e).__name__}: {first}", path) from None
    if tok.eos_token_id is None:
        raise DataFormatError("tokenizer has no end-of-text (eos) token, needed as <sep>", path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


@dataclass
class Encoded:
    """One tokenized example.

    Attributes:
        ids: ``INPUT <sep> [COT <sep>] [MARKER] ANSWER <eos>``.
        s1: position of the first ``<sep>``.
        s2: position of the second ``<sep>`` (explicit layout) or -1.
        answer_start: position of the first ANSWER token.
    """

    ids: list[int]
    s1: int
    s2: int
    answer_start: int


class Layout:
    """Turns examples into token ids following METHOD.md's layout, and decoded text back into answers."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.sep_id = tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        # A from-scratch word vocabulary has an <unk>; an unknown symbol there is a data error.
        self.unk_id = tokenizer.unk_token_id if isinstance(tokenizer.backend_tokenizer.model, models.WordLevel) else None
        self.marker = answer_marker(tokenizer)
        self.marker_ids = self.text_ids(self.marker) if self.marker else []

    def text_ids(self, text: str, where: tuple[str | None, int | None] = (None, None)) -> list[int]:
        """Token ids of a text segment (no special tokens); unknown symbols raise DataFormatError."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.unk_id is not None and self.unk_id in ids:
            unknown = [t for t in text.split() if self.tokenizer.convert_tokens_to_ids(t) == self.unk_id]
            raise DataFormatError(f"symbol(s) {unknown} not in the model's vocabulary", *where)
        return ids

    def prompt_ids(self, text: str, where: tuple[str | None, int | None] = (None, None)) -> list[int]:
        """``INPUT <sep>``: what a model is given at inference."""
        return self.text_ids(text, where) + [self.sep_id]

    def encode(self, ex: Example, with_cot: bool, where: tuple[str | None, int | None] = (None, None)) -> Encoded:
        """Tokenize one example in the explicit (``with_cot``) or no-CoT layout."""
        ids = self.prompt_ids(ex.input, where)
        s1 = len(ids) - 1
        s2 = -1
        if with_cot:
            ids += self.text_ids(ex.cot, where) + [self.sep_id]
            s2 = len(ids) - 1
        ids += self.marker_ids
        answer_start = len(ids)
        ids += self.text_ids(ex.answer, where) + [self.eos_id]
        return Encoded(ids, s1, s2, answer_start)

    def encode_all(self, examples: Sequence[Example], with_cot: bool, path: str | None = None) -> list[Encoded]:
        """Tokenize a file's examples (batched in the Rust tokenizer); errors name ``path`` and the 1-based line."""
        out: list[Encoded] = []
        for start in range(0, len(examples), ENCODE_CHUNK):
            out += self._encode_chunk(examples[start:start + ENCODE_CHUNK], start, with_cot, path)
        return out

    def _encode_chunk(self, examples: Sequence[Example], first: int, with_cot: bool,
                      path: str | None) -> list[Encoded]:
        """``encode_all`` of ``examples``, the file's lines from index ``first`` (0-based) on."""
        parts = [[ex.input for ex in examples], [ex.answer for ex in examples]]
        if with_cot:
            parts.insert(1, [ex.cot for ex in examples])
        # One batched call per segment kind: several times faster than per-example calls.
        backend = self.tokenizer.backend_tokenizer
        encoded = [[e.ids for e in backend.encode_batch(texts, add_special_tokens=False)] for texts in parts]
        out = []
        for i, segs in enumerate(zip(*encoded)):
            if self.unk_id is not None and any(self.unk_id in seg for seg in segs):
                self.encode(examples[i], with_cot, (path, first + i + 1))  # raises with the unknown symbols named
            ids = list(segs[0]) + [self.sep_id]
            s1, s2 = len(ids) - 1, -1
            if with_cot:
                ids += list(segs[1]) + [self.sep_id]
                s2 = len(ids) - 1
            ids += self.marker_ids
            answer_start = len(ids)
            out.append(Encoded(ids + list(segs[-1]) + [self.eos_id], s1, s2, answer_start))
        return out

    def answers(self, generated: torch.Tensor) -> list[str]:
        """The answer texts of a batch of no-CoT generations (B, t) (see :meth:`split_generation`)."""
        return [self.split_generation(row, with_cot=False)[1] for row in generated.tolist()]

    def split_generation(self, ids: Sequence[int], with_cot: bool) -> tuple[str, str]:
        """Split generated ids (after ``INPUT <sep>``) into ``(cot, answer)`` text.

        Explicit layout: ``COT <sep> ANSWER <eos>``; no CoT: ``ANSWER <eos>``; the answer marker, when
        the layout has one and the model wrote it, is not part of the answer. Anything after the
        closing ``<eos>`` is ignored (batched decoding keeps producing tokens for finished rows).
        """
        ids = list(ids)
        seps = [i for i, t in enumerate(ids) if t == self.eos_id]
        if with_cot:
            cut = seps[0] if seps else len(ids)
            cot_ids, rest = ids[:cut], ids[cut + 1:] if seps else []
            end = seps[1] - cut - 1 if len(seps) > 1 else len(rest)
            answer_ids = rest[:end]
        else:
            cot_ids = []
            answer_ids = ids[: seps[0]] if seps else ids
        n = len(self.marker_ids)
        if n and answer_ids[:n] == self.marker_ids:
            answer_ids = answer_ids[n:]
        return self._decode(cot_ids), self._decode(answer_ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
