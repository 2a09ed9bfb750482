"""Tests of icot.data.gsm8k: original GSM8K -> equation-only COT."""

from __future__ import annotations

from pathlib import Path

import pytest

from icot.data import Example, read_examples
from icot.data.gsm8k import AnnotationError, convert_original, equations_from_annotated

SHARED = Path(__file__).resolve().parents[2] / "shared"
GSM8K = SHARED / "data" / "gsm8k"

ORIGINAL = """\
Tom has 2 apples.  He buys 3 more. How many?||He has 2+3 = <<2+3=5>>5. Then 5*2=<<5*2=10>>10 #### 10
Who knows?||Let x be the number. Then x = 9 #### 9
Broken one?||It is 4 = <<4>>4 #### 4
Sue pays $1,000.||She pays 2*500 = <<2*500=1000>>1000 #### 1,000
"""


def test_equations_from_annotated():
    text = "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute, so 0.2 x 50 = $<<0.2*50=10>>10."
    assert equations_from_annotated(text) == ["<<12/60=0.2>>", "<<0.2*50=10>>"]
    assert equations_from_annotated("no annotations here") == []


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("a <<4>> b", "no '='"),
        ("a <<2+2=4 b", "never closed"),
        ("a 2+2=4>> b", "without '<<'"),
        ("a <<2+<<2=4>> b", "another '<<'"),
        ("a <<=4>> b", "not 'expr=value'"),
    ],
)
def test_bad_annotations(text, reason):
    with pytest.raises(AnnotationError, match=reason):
        equations_from_annotated(text)


def test_convert_tiny_file(tmp_path):
    src, out = tmp_path / "orig.txt", tmp_path / "out.txt"
    src.write_text(ORIGINAL, encoding="utf-8")
    report = convert_original(src, out)
    assert report.written == 2
    assert [n for n, _ in report.failed] == [2, 3]
    assert "no <<expr=value>>" in report.failed[0][1] and "no '='" in report.failed[1][1]
    assert report.summary().startswith("wrote 2 of 4 lines; 2 failed (line 2:")
    assert read_examples(out) == [
        Example("Tom has 2 apples.  He buys 3 more. How many?", "<<2+3=5>> <<5*2=10>>", "10"),
        Example("Sue pays $1,000.", "<<2*500=1000>>", "1,000"),
    ]


def test_keep_unannotated(tmp_path):
    src, out = tmp_path / "orig.txt", tmp_path / "out.txt"
    src.write_text(ORIGINAL, encoding="utf-8")
    report = convert_original(src, out, keep_unannotated=True)
    assert (report.written, [n for n, _ in report.failed]) == (3, [3])
    assert out.read_text(encoding="utf-8").splitlines()[1] == "Who knows?|| #### 9"


def test_convert_real_training_set(tmp_path):
    out = tmp_path / "train.txt"
    report = convert_original(GSM8K / "train_original.txt", out)
    assert report.written + len(report.failed) == 7473
    assert report.written == 7378 and report.excluded == 0
    converted = {e.input: e.to_line() for e in read_examples(out)}
    # The papers' validation lines come from this training set: the conversion reproduces them.
    valid = [e for e in read_examples(GSM8K / "valid.txt", allow_empty_cot=True) if e.cot]
    assert len(valid) == 494
    assert all(converted[e.input] == e.to_line() for e in valid)


def test_convert_excluding_validation(tmp_path):
    report = convert_original(
        GSM8K / "train_original.txt", tmp_path / "train.txt", exclude_paths=[GSM8K / "valid.txt"]
    )
    assert report.excluded == 500
    assert report.written + len(report.failed) + report.excluded == 7473
