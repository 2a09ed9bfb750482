"""Tests of icot.data.multiplication against the papers' validation files."""

from __future__ import annotations

from pathlib import Path

import pytest

from icot.data import read_examples, read_inputs
from icot.data.multiplication import (
    check_file,
    check_line,
    format_input,
    generate_examples,
    make_example,
    parse_input,
    write_training_file,
)
from icot.errors import DataFormatError

SHARED = Path(__file__).resolve().parents[2] / "shared"
MULT_SIZES = ["4x4", "5x5", "7x7", "9x9", "11x11"]


def _valid_path(size: str) -> Path:
    return SHARED / "data" / "mult" / size / "valid.txt"


def _input(line: str) -> str:
    return line.split("||", 1)[0]


def test_method_example():
    assert make_example(3719, 3349, 4, 4) == (
        "9 1 7 3 * 9 4 3 3||1 7 4 3 3 + 0 6 7 8 4 1 ( 1 3 2 2 8 1 ) + 0 0 7 5 1 1 1 "
        "( 1 3 9 7 9 2 1 ) + 0 0 0 7 5 1 1 1 #### 1 3 9 4 5 4 2 1"
    )
    assert parse_input("9 1 7 3 * 9 4 3 3") == (3719, 3349, 4, 4)


@pytest.mark.parametrize("size", MULT_SIZES)
def test_reproduces_every_validation_line(size):
    lines = _valid_path(size).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1000
    for line in lines:
        assert make_example(*parse_input(_input(line))) == line


def test_small_shapes():
    assert make_example(8, 6, 1, 1) == "8 * 6||8 4 #### 8 4"
    assert make_example(73, 40, 2, 2) == "3 7 * 0 4||0 0 0 + 0 2 9 2 #### 0 2 9 2"


@pytest.mark.parametrize(
    ("a", "b", "n", "m"),
    [
        (999, 10, 4, 2),
        (10000, 10, 4, 2),
        (1000, 9, 4, 2),
        (-1000, 10, 4, 2),
        (1000, 10, 0, 2),
        (1.0, 10, 1, 2),
    ],
)
def test_make_example_rejects_wrong_operands(a, b, n, m):
    with pytest.raises(ValueError):
        make_example(a, b, n, m)


@pytest.mark.parametrize("text", ["1 2 * x 4", "1 2 3 4", "1 2 * * 3", "* 3", "12 * 3"])
def test_parse_input_rejects_non_digits(text):
    with pytest.raises(DataFormatError):
        parse_input(text)


@pytest.mark.parametrize(
    ("n", "m"), [(1, 1), (1, 3), (3, 1), (2, 2), (4, 4), (5, 5), (11, 11), (7, 3)]
)
def test_generated_lines_match_reference(n, m):
    lines = generate_examples(n, m, 60, seed=3)
    assert len(lines) == 60
    for line in lines:
        assert make_example(*parse_input(_input(line))) == line


def test_generation_is_deterministic_and_duplicate_free():
    first = generate_examples(4, 4, 2000, seed=1)
    assert first == generate_examples(4, 4, 2000, seed=1)
    assert first != generate_examples(4, 4, 2000, seed=2)
    assert len(set(first)) == 2000


def test_whole_small_space_without_duplicates():
    lines = generate_examples(1, 2, 810, seed=0)
    assert len({_input(line) for line in lines}) == 810


def test_exclusion_in_a_small_space():
    excluded = {format_input(a, b, 1, 1) for a in range(1, 10) for b in (2, 5)}
    lines = generate_examples(1, 1, 81 - len(excluded), seed=0, exclude=excluded | {"not * it"})
    inputs = {_input(line) for line in lines}
    assert len(inputs) == 81 - 18
    assert not inputs & excluded
    with pytest.raises(ValueError, match="only 63 pairs"):
        generate_examples(1, 1, 64, seed=0, exclude=excluded)


def test_exclusion_with_sampling():
    # 2x2 has 8100 pairs: 1000 of them sampled, 4000 excluded, so collisions are certain.
    excluded = set(generate_examples(2, 2, 4000, seed=5))
    excluded_inputs = {_input(line) for line in excluded}
    lines = generate_examples(2, 2, 1000, seed=6, exclude=excluded_inputs)
    assert not {_input(line) for line in lines} & excluded_inputs
    assert len(set(lines)) == 1000


def test_count_too_large():
    with pytest.raises(ValueError, match="cannot draw 82 distinct 1x1"):
        generate_examples(1, 1, 82, seed=0)


def test_training_file_excludes_validation_inputs(tmp_path):
    out = tmp_path / "sub" / "train.txt"
    exclude = [_valid_path("4x4"), _valid_path("5x5")]
    stats = write_training_file(out, 4, 4, 3000, seed=0, exclude_paths=exclude)
    assert stats["count"] == 3000 and stats["excluded_inputs"] == 1000
    examples = read_examples(out)
    assert len(examples) == 3000
    assert not {e.input for e in examples} & read_inputs(_valid_path("4x4"))


def test_check_accepts_every_validation_line():
    assert check_file(_valid_path("5x5")) == (1000, [])


def test_check_reports_every_line_that_does_not_follow_from_its_input(tmp_path):
    good = make_example(3719, 3349, 4, 4)
    lines = [
        good,
        good.replace("#### 1 3 9", "#### 2 3 9"),          # 2: a wrong answer digit
        good.replace("1 7 4 3 3 +", "1 7 4 3 4 +"),          # 3: a wrong partial product
        "9 1 7 3 * 9 4 3 3||1 7 4 3 3",                     # 4: no answer marker
        "9 1 7 x * 9 4 3 3||1 #### 2",                      # 5: not a multiplication
        good,
    ]
    path = tmp_path / "corrupt.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    checked, problems = check_file(path)
    assert checked == 6
    assert [p.line for p in problems] == [2, 3, 4, 5] and all(p.path == str(path) for p in problems)
    assert "ANSWER does not follow" in problems[0].problem and "'1 3 9 4 5 4 2 1'" in problems[0].problem
    assert "COT does not follow" in problems[1].problem
    assert "'####'" in problems[2].problem and "non-digit symbol 'x'" in problems[3].problem
    check_line(good)  # the reference line itself passes
