"""Tests of icot.data: the line format and strict file reading."""

from __future__ import annotations

from pathlib import Path

import pytest

from icot.data import Example, parse_line, read_examples, read_inputs, write_examples
from icot.errors import DataFormatError

SHARED = Path(__file__).resolve().parents[2] / "shared"
MULT_SIZES = ["4x4", "5x5", "7x7", "9x9", "11x11"]


def test_parse_good_line():
    example = parse_line("1 2 * 3 4||3 6 + 0 4 ( 3 0 1 ) #### 3 0 1 0\n")
    assert example == Example("1 2 * 3 4", "3 6 + 0 4 ( 3 0 1 )", "3 0 1 0")


def test_answer_is_after_last_separator():
    example = parse_line("q||a #### b #### 7")
    assert (example.cot, example.answer) == ("a #### b", "7")


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("question #### 4", "no '||'"),
        ("question||cot 4", "no '####'"),
        ("  ||cot #### 4", "empty INPUT"),
        ("question||   #### 4", "empty COT"),
        ("question||cot ####  ", "empty ANSWER"),
        ("question||cot||more #### 4", "more than one '||'"),
    ],
)
def test_malformed_line_names_file_line_and_problem(line, problem):
    with pytest.raises(DataFormatError) as info:
        parse_line(line, "data/train.txt", 17)
    message = str(info.value)
    assert message.startswith("data/train.txt:17: ")
    assert problem in message
    assert (info.value.path, info.value.line) == ("data/train.txt", 17)


def test_empty_cot_allowed_on_request():
    assert parse_line("q|| #### 9", allow_empty_cot=True) == Example("q", "", "9")


def test_round_trip():
    example = Example("Ann has 3 apples.  How many?", "<<1+2=3>> <<3*2=6>>", "6")
    assert parse_line(example.to_line()) == example


def test_read_and_write_files(tmp_path):
    examples = [Example("a", "b", "c"), Example("d é", "e", "1,000")]
    path = tmp_path / "x.txt"
    assert write_examples(path, examples) == 2
    assert read_examples(path) == examples
    assert read_inputs(path) == {"a", "d é"}


def test_last_line_without_newline(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("a||b #### c\nd||e #### f", encoding="utf-8")
    assert [e.answer for e in read_examples(path)] == ["c", "f"]


def _read_error(tmp_path, data: bytes) -> DataFormatError:
    path = tmp_path / "bad.txt"
    path.write_bytes(data)
    with pytest.raises(DataFormatError) as info:
        read_examples(path)
    return info.value


def test_blank_line_is_an_error(tmp_path):
    err = _read_error(tmp_path, b"a||b #### c\n\nd||e #### f\n")
    assert str(err).startswith(f"{tmp_path / 'bad.txt'}:2: ")
    assert "blank line" in str(err)


def test_empty_file_is_an_error(tmp_path):
    err = _read_error(tmp_path, b"")
    assert "bad.txt: no examples" in str(err)


def test_non_utf8_byte_names_line(tmp_path):
    err = _read_error(tmp_path, b"a||b #### c\nd\xff||e #### f\n")
    assert str(err).startswith(f"{tmp_path / 'bad.txt'}:2: ")
    assert "UTF-8" in str(err) and "0xff" in str(err)


def test_malformed_line_in_file_names_its_line(tmp_path):
    err = _read_error(tmp_path, b"a||b #### c\nd||e #### f\ng||h\n")
    assert str(err).startswith(f"{tmp_path / 'bad.txt'}:3: no '####'")


def test_write_rejects_unreadable_example(tmp_path):
    with pytest.raises(DataFormatError, match="x.txt:2: "):
        write_examples(tmp_path / "x.txt", [Example("a", "b", "c"), Example("a||b", "c", "d")])


@pytest.mark.parametrize("size", MULT_SIZES)
def test_shared_multiplication_files_read(size):
    assert len(read_examples(SHARED / "data" / "mult" / size / "valid.txt")) == 1000


def test_shared_gsm8k_valid_reads():
    path = SHARED / "data" / "gsm8k" / "valid.txt"
    examples = read_examples(path, allow_empty_cot=True)
    assert len(examples) == 500
    # The papers' validation set keeps 6 questions without calculator annotations (empty COT);
    # they are rejected unless asked for.
    assert sum(not e.cot for e in examples) == 6
    with pytest.raises(DataFormatError, match="empty COT"):
        read_examples(path)
