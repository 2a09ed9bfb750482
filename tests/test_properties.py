"""Property-based tests (hypothesis): the data parser and the command line's handling of arbitrary input.

The parser must read back every well-formed line exactly, and name the file and line of every malformed
one; the command line, given arbitrary bytes as a data file or config, answers with exit status 0 or with
exit status 2 and one line, never a traceback.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from icot.cli import main
from icot.data import Example, parse_line, read_examples
from icot.errors import DataFormatError

FAST = settings(max_examples=150, deadline=None)
SLOW = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# A field: any characters but the separators' and line breaks, without surrounding whitespace.
field = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="|#\r\n"), min_size=1,
                max_size=30).map(str.strip).filter(bool)
# Text built mostly from the characters that make up the format, so that near-misses are common.
structured = st.text(st.sampled_from(list("||||####  \t\r9 * 1 + ( ) a é\x85\u2028")), max_size=40)
any_text = st.one_of(structured, st.text(max_size=40))


@FAST
@given(field, field, field)
def test_well_formed_lines_read_back_exactly(inp, cot, answer):
    example = Example(inp, cot, answer)
    assert parse_line(f"{inp}||{cot} #### {answer}") == example
    assert parse_line(example.to_line() + "\n") == example
    assert parse_line(f"  {inp} ||  {cot}####{answer}  \r\n") == example


@FAST
@given(field, st.lists(field, min_size=1, max_size=3), field)
def test_cot_may_hold_the_answer_separator(inp, parts, answer):
    cot = " #### ".join(parts)  # the ANSWER follows the last '####'
    assert parse_line(f"{inp}||{cot} #### {answer}") == Example(inp, cot, answer)


@FAST
@given(any_text, st.integers(1, 10**6))
def test_every_line_parses_or_names_file_and_line(text, line_no):
    try:
        example = parse_line(text, "data.txt", line_no)
    except DataFormatError as e:
        assert str(e).startswith(f"data.txt:{line_no}: ")
        assert "\n" not in str(e).rstrip("\n")  # one line, whatever the text held
        return
    assert example.input and example.cot and example.answer
    assert all(part == part.strip() for part in (example.input, example.cot, example.answer))
    assert "||" not in example.input and "####" not in example.answer


@FAST
@given(any_text.filter(lambda t: "||" not in t), st.integers(1, 100))
def test_a_line_without_input_separator_is_refused(text, line_no):
    try:
        parse_line(text, "data.txt", line_no)
    except DataFormatError as e:
        assert str(e).startswith(f"data.txt:{line_no}: ") and "'||'" in str(e)
    else:
        raise AssertionError("accepted a line without '||'")


def _file_bytes() -> st.SearchStrategy[bytes]:
    """Whole files: random bytes, or lines of near-miss text, sometimes with a good line mixed in."""
    good = b"9 1 * 3 4||7 2 + 0 6 3 #### 7 8 3 0"
    lines = st.lists(st.one_of(structured.map(lambda t: t.encode("utf-8", "surrogatepass")), st.just(good),
                               st.binary(max_size=20)), max_size=5)
    return st.one_of(st.binary(max_size=80), lines.map(b"\n".join))


@FAST
@given(_file_bytes())
def test_read_examples_reads_every_line_or_names_file_and_line(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "data.txt")
        path.write_bytes(data)
        try:
            examples = read_examples(path)
        except DataFormatError as e:
            assert str(e).startswith(f"{path}:")
            return
    text = data.decode("utf-8").removeprefix("\ufeff")
    assert len(examples) == len(text.removesuffix("\n").split("\n"))


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _assert_clean_outcome(code: int, err: str, path: Path) -> None:
    assert "Traceback" not in err
    if code == 0:
        return
    assert code == 2
    lines = [x for x in err.splitlines() if x.startswith("icot: error: ")]
    assert len(lines) == 1 and err.rstrip("\n").endswith(lines[0]), err
    assert str(path) in lines[0]


@FAST
@given(_file_bytes())
def test_cli_data_file_of_arbitrary_bytes(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "exclude.txt")
        path.write_bytes(data)
        code, _, err = _run_cli(["data", "mult", "--digits", "2", "--count", "3", "--out", str(Path(tmp, "o.txt")),
                                 "--exclude", str(path)])
        _assert_clean_outcome(code, err, path)


@SLOW
@given(_file_bytes())
def test_cli_eval_on_arbitrary_bytes(trained_nocot, data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "test.txt")
        path.write_bytes(data)
        code, _, err = _run_cli(["eval", "--model", str(trained_nocot), "--data", str(path), "--limit", "2",
                                 "--max-new-tokens", "4"])
        _assert_clean_outcome(code, err, path)


@FAST
@given(st.one_of(st.binary(max_size=60), structured.map(str.encode),
                 st.dictionaries(st.one_of(st.integers(), st.sampled_from(["teacher", "model", "data", "lr"])),
                                 st.one_of(st.integers(), st.text(max_size=5), st.none()), max_size=3)
                 .map(lambda d: repr(d).encode())))
def test_cli_config_of_arbitrary_bytes(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "config.yaml")
        path.write_bytes(data)
        code, _, err = _run_cli(["train", "teacher", "--config", str(path), "--out", str(Path(tmp, "t"))])
        assume(code != 0)  # a random config never names training data, so it cannot train
        assert code == 2 and "Traceback" not in err
        lines = [x for x in err.splitlines() if x.startswith("icot: error: ")]
        assert len(lines) == 1, err
