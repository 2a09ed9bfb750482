"""Data lines ``INPUT||COT #### ANSWER``: parsing, strict reading and writing.

Every problem raises :class:`icot.errors.DataFormatError`, whose message reads
``FILE:LINE: problem``. Nothing is skipped silently.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from icot.errors import DataFormatError

__all__ = [
    "DataFormatError",
    "Example",
    "parse_line",
    "read_examples",
    "read_inputs",
    "write_examples",
]

INPUT_SEP = "||"
ANSWER_SEP = "####"
_SNIPPET_CHARS = 60


@dataclass(frozen=True)
class Example:
    """One example.

    Attributes:
        input: The question (text before ``||``).
        cot: The chain of thought (between ``||`` and the last ``####``).
        answer: The answer (after the last ``####``).
    """

    input: str
    cot: str
    answer: str

    def to_line(self) -> str:
        """Returns the example as one data line, without a newline."""
        return f"{self.input}{INPUT_SEP}{self.cot} {ANSWER_SEP} {self.answer}"


def _snippet(line: str) -> str:
    """Returns a short quoted excerpt of a line for error messages."""
    if len(line) > _SNIPPET_CHARS:
        line = line[:_SNIPPET_CHARS] + "..."
    return repr(line)


def parse_line(
    line: str,
    path: str | Path | None = None,
    line_no: int | None = None,
    *,
    allow_empty_cot: bool = False,
) -> Example:
    """Parses ``INPUT||COT #### ANSWER``.

    Splits on the first ``||``, then the rest on the last ``####``; each part is stripped.

    Args:
        line: The line; a trailing newline is removed.
        path: File named in errors.
        line_no: 1-based line number named in errors.
        allow_empty_cot: Accept ``INPUT|| #### ANSWER``. The GSM8K validation set of the papers
            has such lines (questions whose original solution has no calculator annotation).

    Raises:
        DataFormatError: If a separator is missing or repeated, or a part is empty.
    """
    line = line.rstrip("\r\n")

    def fail(problem: str) -> DataFormatError:
        return DataFormatError(f"{problem} in {_snippet(line)}", path, line_no)

    n_sep = line.count(INPUT_SEP)
    if n_sep == 0:
        raise fail("no '||' between INPUT and COT (expected 'INPUT||COT #### ANSWER')")
    if n_sep > 1:
        raise fail(f"more than one '||' ({n_sep} found; expected exactly one, after INPUT)")
    raw_input, rest = line.split(INPUT_SEP, 1)
    if ANSWER_SEP not in rest:
        raise fail("no '####' between COT and ANSWER (expected 'INPUT||COT #### ANSWER')")
    raw_cot, raw_answer = rest.rsplit(ANSWER_SEP, 1)
    example = Example(raw_input.strip(), raw_cot.strip(), raw_answer.strip())
    if not example.input:
        raise fail("empty INPUT (nothing before '||')")
    if not example.cot and not allow_empty_cot:
        raise fail("empty COT (nothing between '||' and '####')")
    if not example.answer:
        raise fail("empty ANSWER (nothing after the last '####')")
    return example


def _decode_utf8(data: bytes, path: str | Path) -> str:
    """Decodes strictly; a bad byte is reported with its line and column."""
    if data.startswith(codecs.BOM_UTF8):
        # A byte-order mark is an encoding artefact, not part of the first INPUT.
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_no = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        bad = data[err.start : err.end].hex(" ")
        raise DataFormatError(
            f"not valid UTF-8: byte(s) 0x{bad} at column {column} ({err.reason})", path, line_no
        ) from None


def read_lines(path: str | Path) -> list[str]:
    """The lines of a data file, without their newlines.

    Raises:
        DataFormatError: On a non-UTF-8 byte or an empty file.
    """
    text = _decode_utf8(Path(path).read_bytes(), path)
    # split("\n"), not splitlines(): questions may hold characters such as U+2028 that
    # splitlines() would treat as line breaks, shifting line numbers.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it does not start a new one
    if not lines:
        raise DataFormatError("no examples (the file is empty)", path)
    return lines


def read_examples(path: str | Path, *, allow_empty_cot: bool = False) -> list[Example]:
    """Reads a data file, one example per line.

    Args:
        path: A UTF-8 text file.
        allow_empty_cot: Passed to :func:`parse_line`.

    Raises:
        DataFormatError: On a non-UTF-8 byte, a blank line, a malformed line or an empty file.
    """
    lines = read_lines(path)
    examples = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            raise DataFormatError("blank line (every line must be an example)", path, line_no)
        examples.append(parse_line(line, path, line_no, allow_empty_cot=allow_empty_cot))
    return examples


def read_inputs(path: str | Path, *, allow_empty_cot: bool = True) -> set[str]:
    """Returns the INPUT of every line of a data file (for excluding them from training data).

    Empty COTs are accepted by default: only the INPUT matters here.
    """
    return {example.input for example in read_examples(path, allow_empty_cot=allow_empty_cot)}


def write_examples(path: str | Path, examples: Iterable[Example]) -> int:
    """Writes examples one per line (UTF-8, ``\\n``) and returns how many were written.

    Raises:
        DataFormatError: If an example would not read back as itself (a newline or ``||``
            inside a field, a field with surrounding spaces, an empty INPUT or ANSWER).
    """
    lines = []
    for line_no, example in enumerate(examples, start=1):
        lines.append(_checked_line(example, path, line_no))
    Path(path).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return len(lines)


def _checked_line(example: Example, path: str | Path, line_no: int) -> str:
    """Returns ``example.to_line()`` after checking that it parses back to the same example."""
    line = example.to_line()
    if any(ch in line for ch in "\r\n"):
        raise DataFormatError("example contains a line break", path, line_no)
    if parse_line(line, path, line_no, allow_empty_cot=True) != example:
        raise DataFormatError(f"example would not read back as itself: {example!r}", path, line_no)
    return line
