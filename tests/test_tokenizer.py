"""Tests of icot.tokenizer: vocabularies, METHOD.md's token layout, and splitting generations."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from icot import tokenizer as tokenizer_module
from icot.data import Example, parse_line, read_examples
from icot.data.multiplication import generate_examples
from icot.errors import DataFormatError
from icot.tokenizer import (
    EOS,
    Layout,
    build_bpe_tokenizer,
    build_word_tokenizer,
    load_tokenizer,
)

PAPER_LINE = ("9 1 7 3 * 9 4 3 3||1 7 4 3 3 + 0 6 7 8 4 1 ( 1 3 2 2 8 1 ) + 0 0 7 5 1 1 1 "
              "( 1 3 9 7 9 2 1 ) + 0 0 0 7 5 1 1 1 #### 1 3 9 4 5 4 2 1")

GSM_EXAMPLES = [
    Example("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
            "How many clips did Natalia sell altogether in April and May?", "<<48/2=24>> <<48+24=72>>", "72"),
    Example("Weng earns $12 an hour for babysitting.  Yesterday, she just did 50 minutes of babysitting. "
            "How much did she earn?", "<<12/60=0.2>> <<0.2*50=10>>", "10"),
    Example("Betty is saving money for a new wallet which costs $100.", "<<100/2=50>> <<15*2=30>>", "5,000"),
]


@pytest.fixture
def paper_example() -> Example:
    return parse_line(PAPER_LINE)


@pytest.fixture
def word_tok(paper_example):
    return build_word_tokenizer([paper_example] + [parse_line(x) for x in generate_examples(2, 2, 50, seed=0)])


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_word_tokenizer_round_trip(word_tok, paper_example):
    for part in (paper_example.input, paper_example.cot, paper_example.answer):
        ids = _ids(word_tok, part)
        assert len(ids) == len(part.split())  # one token per symbol
        assert word_tok.unk_token_id not in ids
        assert word_tok.decode(ids) == part


def test_word_vocabulary_has_specials_and_symbols(word_tok, paper_example):
    assert word_tok.convert_ids_to_tokens(word_tok.eos_token_id) == EOS
    assert word_tok.pad_token_id is not None and word_tok.pad_token_id != word_tok.eos_token_id
    symbols = set(PAPER_LINE.replace("||", " ").split()) - {"####"}
    for s in symbols:
        assert word_tok.convert_tokens_to_ids(s) != word_tok.unk_token_id
    # Symbols + <|endoftext|>, <pad>, <unk>: nothing else.
    assert len(word_tok) == len(symbols) + 3


def test_layout_explicit(word_tok, paper_example):
    layout = Layout(word_tok)
    assert layout.sep_id == layout.eos_id == word_tok.convert_tokens_to_ids(EOS)
    enc = layout.encode(paper_example, with_cot=True)
    n_in, n_cot, n_ans = (len(p.split()) for p in (paper_example.input, paper_example.cot, paper_example.answer))
    # INPUT <sep> COT <sep> ANSWER <eos>
    assert len(enc.ids) == n_in + 1 + n_cot + 1 + n_ans + 1
    assert enc.s1 == n_in
    assert enc.s2 == n_in + 1 + n_cot
    assert enc.answer_start == enc.s2 + 1
    assert enc.ids[enc.s1] == layout.sep_id and enc.ids[enc.s2] == layout.sep_id
    assert enc.ids[-1] == layout.eos_id
    # Exactly three end-of-text tokens: the two separators and the end.
    assert [i for i, t in enumerate(enc.ids) if t == layout.eos_id] == [enc.s1, enc.s2, len(enc.ids) - 1]
    assert word_tok.decode(enc.ids[: enc.s1]) == paper_example.input
    assert word_tok.decode(enc.ids[enc.s1 + 1: enc.s2]) == paper_example.cot
    assert word_tok.decode(enc.ids[enc.answer_start: -1]) == paper_example.answer


def test_layout_nocot(word_tok, paper_example):
    layout = Layout(word_tok)
    enc = layout.encode(paper_example, with_cot=False)
    n_in, n_ans = len(paper_example.input.split()), len(paper_example.answer.split())
    # INPUT <sep> ANSWER <eos>
    assert len(enc.ids) == n_in + 1 + n_ans + 1
    assert (enc.s1, enc.s2, enc.answer_start) == (n_in, -1, n_in + 1)
    assert enc.ids[enc.s1] == layout.sep_id and enc.ids[-1] == layout.eos_id
    assert word_tok.decode(enc.ids[enc.answer_start: -1]) == paper_example.answer
    assert layout.prompt_ids(paper_example.input) == enc.ids[: enc.s1 + 1]


@pytest.mark.parametrize("with_cot", [True, False])
def test_encode_all_equals_encode(word_tok, with_cot):
    examples = [parse_line(x) for x in generate_examples(2, 2, 30, seed=0)] + [parse_line(PAPER_LINE)]
    layout = Layout(word_tok)
    assert layout.encode_all(examples, with_cot) == [layout.encode(ex, with_cot) for ex in examples]


@pytest.mark.parametrize("with_cot", [True, False])
def test_encode_all_equals_encode_bpe(with_cot):
    tok = build_bpe_tokenizer(GSM_EXAMPLES, 300)
    layout = Layout(tok)
    assert layout.unk_id is None  # byte-level: nothing is unknown
    assert layout.encode_all(GSM_EXAMPLES, with_cot) == [layout.encode(ex, with_cot) for ex in GSM_EXAMPLES]


def test_unknown_symbol_names_file_and_line(word_tok, tmp_path):
    lines = generate_examples(2, 2, 5, seed=0)
    lines[2] = lines[2].replace("*", "x", 1)  # 'x' is not in the vocabulary
    path = tmp_path / "odd.txt"
    path.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    examples = read_examples(path)
    layout = Layout(word_tok)
    for with_cot in (True, False):
        with pytest.raises(DataFormatError) as info:
            layout.encode_all(examples, with_cot, str(path))
        assert str(info.value).startswith(f"{path}:3: ")
        assert "'x'" in str(info.value)
        assert (info.value.path, info.value.line) == (str(path), 3)


@pytest.mark.parametrize("with_cot", [True, False])
def test_encode_all_in_chunks_equals_encode(word_tok, with_cot, monkeypatch):
    """A file is tokenized a chunk at a time (to bound the tokenizer's memory): chunk edges change nothing."""
    examples = [parse_line(x) for x in generate_examples(2, 2, 7, seed=0)]
    monkeypatch.setattr(tokenizer_module, "ENCODE_CHUNK", 3)
    layout = Layout(word_tok)
    assert layout.encode_all(examples, with_cot) == [layout.encode(ex, with_cot) for ex in examples]


def test_unknown_symbol_in_a_later_chunk_names_its_own_line(word_tok, tmp_path, monkeypatch):
    lines = generate_examples(2, 2, 7, seed=0)
    lines[5] = lines[5].replace("*", "x", 1)  # line 6: the second chunk's third line
    path = tmp_path / "odd.txt"
    path.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    monkeypatch.setattr(tokenizer_module, "ENCODE_CHUNK", 3)
    with pytest.raises(DataFormatError) as info:
        Layout(word_tok).encode_all(read_examples(path), True, str(path))
    assert (info.value.path, info.value.line) == (str(path), 6)


def test_unknown_symbol_in_cot_or_answer_is_found(word_tok):
    layout = Layout(word_tok)
    ex = parse_line(generate_examples(2, 2, 1, seed=0)[0])
    with pytest.raises(DataFormatError, match="'Q'"):
        layout.encode(Example(ex.input, ex.cot + " Q", ex.answer), with_cot=True, where=("f.txt", 7))
    with pytest.raises(DataFormatError, match="^f.txt:7: .*'Z'"):
        layout.encode(Example(ex.input, ex.cot, ex.answer + " Z"), with_cot=False, where=("f.txt", 7))
    # Without CoT, a bad symbol in the (unused) CoT does not matter.
    assert layout.encode(Example(ex.input, "Q", ex.answer), with_cot=False).s2 == -1


def test_split_generation_explicit(word_tok, paper_example):
    layout = Layout(word_tok)
    enc = layout.encode(paper_example, with_cot=True)
    generated = enc.ids[enc.s1 + 1:]  # what the model writes after INPUT <sep>
    assert layout.split_generation(generated, True) == (paper_example.cot, paper_example.answer)
    # Batched decoding keeps producing tokens after the closing <eos>: they are ignored.
    garbage = _ids(word_tok, "7 7 +") + [layout.eos_id] + _ids(word_tok, "3") + [layout.pad_id]
    assert layout.split_generation(generated + garbage, True) == (paper_example.cot, paper_example.answer)
    # Cut off before the second <sep>: everything is CoT, no answer.
    cot_only = enc.ids[enc.s1 + 1: enc.s2]
    assert layout.split_generation(cot_only, True) == (paper_example.cot, "")
    # Cut off before the closing <eos>: the answer is what came after the second <sep>.
    assert layout.split_generation(enc.ids[enc.s1 + 1: -1], True) == (paper_example.cot, paper_example.answer)


def test_split_generation_nocot(word_tok, paper_example):
    layout = Layout(word_tok)
    enc = layout.encode(paper_example, with_cot=False)
    generated = enc.ids[enc.s1 + 1:]
    assert layout.split_generation(generated, False) == ("", paper_example.answer)
    garbage = _ids(word_tok, "1 2") + [layout.eos_id, layout.pad_id, layout.pad_id]
    assert layout.split_generation(generated + garbage, False) == ("", paper_example.answer)
    assert layout.split_generation(generated[:-1], False) == ("", paper_example.answer)
    assert layout.split_generation([layout.eos_id] + generated, False) == ("", "")


def test_bpe_round_trip():
    tok = build_bpe_tokenizer(GSM_EXAMPLES, 400)
    assert len(tok) <= 400
    assert tok.convert_ids_to_tokens(tok.eos_token_id) == EOS
    texts = [p for ex in GSM_EXAMPLES for p in (ex.input, ex.cot, ex.answer)]
    texts.append("Unseen text: naïve café costs €3.50 — 2 + 2 = 4?")  # bytes never seen in training
    for text in texts:
        ids = _ids(tok, text)
        assert tok.eos_token_id not in ids and tok.pad_token_id not in ids
        assert tok.decode(ids) == text
    # The layout decodes what a model would generate back into the CoT and the answer.
    layout = Layout(tok)
    for ex in GSM_EXAMPLES:
        enc = layout.encode(ex, with_cot=True)
        assert layout.split_generation(enc.ids[enc.s1 + 1:], True) == (ex.cot, ex.answer)


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_saved_tokenizer_reloads_with_identical_ids(kind, tmp_path, paper_example):
    if kind == "word":
        examples = [paper_example] + [parse_line(x) for x in generate_examples(2, 2, 20, seed=0)]
        tok = build_word_tokenizer(examples)
    else:
        examples = GSM_EXAMPLES
        tok = build_bpe_tokenizer(examples, 300)
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert len(again) == len(tok)
    assert (again.eos_token_id, again.pad_token_id, again.unk_token_id) == (
        tok.eos_token_id, tok.pad_token_id, tok.unk_token_id)
    a, b = Layout(tok), Layout(again)
    assert (a.sep_id, a.eos_id, a.pad_id, a.unk_id) == (b.sep_id, b.eos_id, b.pad_id, b.unk_id)
    for with_cot in (True, False):
        assert b.encode_all(examples, with_cot) == a.encode_all(examples, with_cot)
    for ex in examples:
        for part in (ex.input, ex.cot, ex.answer):
            assert _ids(again, part) == _ids(tok, part)
            assert again.decode(_ids(again, part)) == part


def _plain_tokenizer(**specials) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab={EOS: 0, "a": 1, "b": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def test_pretrained_tokenizer_without_pad_gets_eos_as_pad(tmp_path):
    tok = _plain_tokenizer(eos_token=EOS)  # like GPT-2: an end-of-text token and no pad
    assert tok.pad_token_id is None
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token_id == loaded.eos_token_id == 0
    layout = Layout(loaded)
    assert layout.pad_id == layout.eos_id == layout.sep_id == 0
    assert layout.encode(Example("a b", "b", "a"), with_cot=True).ids == [1, 2, 0, 2, 0, 1, 0]


def test_tokenizer_without_eos_is_refused(tmp_path):
    _plain_tokenizer(pad_token="[UNK]").save_pretrained(tmp_path)
    with pytest.raises(DataFormatError, match="eos"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_answer_marker_stands_before_the_answer_in_every_layout(kind, paper_example, tmp_path):
    examples = [paper_example] + [parse_line(x) for x in generate_examples(2, 2, 50, seed=0)]
    plain = Layout(build_word_tokenizer(examples) if kind == "word" else build_bpe_tokenizer(examples, 400))
    tok = build_word_tokenizer(examples, "####") if kind == "word" else build_bpe_tokenizer(examples, 400, "####")
    marked = Layout(tok)
    marker = marked.text_ids("####")
    assert marked.marker_ids == marker and marker and plain.marker_ids == []
    for with_cot in (True, False):
        e, p = marked.encode(paper_example, with_cot), plain.encode(paper_example, with_cot)
        answer = marked.text_ids(paper_example.answer) + [marked.eos_id]
        assert e.ids[e.answer_start:] == answer
        assert e.ids[e.answer_start - len(marker): e.answer_start] == marker
        assert e.ids[:e.answer_start - len(marker)] == marked.encode(paper_example, with_cot).ids[:len(p.ids) - len(answer)]
        assert marked.encode_all([paper_example], with_cot)[0] == e
        # The model writes the marker; it is not part of the answer.
        generated = e.ids[e.s1 + 1:]
        assert marked.split_generation(generated, with_cot)[1] == paper_example.answer
    tok.save_pretrained(tmp_path)
    assert Layout(load_tokenizer(tmp_path)).marker_ids == marker  # the layout travels with the vocabulary
