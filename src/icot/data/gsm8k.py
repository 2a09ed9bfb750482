"""GSM8K with natural-language solutions -> GSM8K-Aug format (equation-only COT).

The original file (``shared/data/gsm8k/train_original.txt``) has lines
``QUESTION||SOLUTION #### ANSWER`` whose SOLUTION is prose with calculator annotations
``<<expr=value>>``. The target (``shared/data/gsm8k/valid.txt``) keeps only the annotations,
verbatim and joined by single spaces: ``QUESTION||<<4-2=2>> <<2/.5=4>> #### 300``.

INPUT and ANSWER are copied verbatim (after the usual stripping of surrounding spaces); no
normalization is applied. This was checked against ``valid.txt``: it keeps the questions'
double spaces after full stops (128 of its 500 lines) and thousands separators in answers
(``#### 5,000``), and all 500 of its questions occur byte-identical in ``train_original.txt``,
whose conversion by this module reproduces all 500 validation lines exactly.

Note that the validation questions are a subset of ``train_original.txt``: pass the validation
file in ``exclude_paths`` when deriving training data. ``valid.txt`` also keeps 6 questions
whose solution has no annotation, with an empty COT (``QUESTION|| #### 9``); this converter
drops such lines by default and reports them (``keep_unannotated=True`` keeps them the same way).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from icot.data import Example, read_examples, read_inputs, write_examples
from icot.errors import DataFormatError

__all__ = ["AnnotationError", "ConversionReport", "convert_original", "equations_from_annotated"]

_OPEN, _CLOSE = "<<", ">>"


class AnnotationError(ValueError):
    """A ``<<...>>`` annotation that cannot be parsed; the message says why and where."""


def _check_equation(inner: str, column: int) -> None:
    """Checks that an annotation body reads ``expr=value``."""
    if "=" not in inner:
        raise AnnotationError(f"annotation <<{inner}>> at column {column} has no '='")
    expr, value = inner.rsplit("=", 1)
    if not expr.strip() or not value.strip():
        raise AnnotationError(f"annotation <<{inner}>> at column {column} is not 'expr=value'")


def equations_from_annotated(cot_text: str) -> list[str]:
    """Returns the ``<<expr=value>>`` annotations of a solution, in order and verbatim.

    Raises:
        AnnotationError: On an unclosed ``<<``, a ``>>`` without ``<<``, a nested ``<<``, or a
            body that is not ``expr=value``. Columns in messages are 1-based within ``cot_text``.
    """
    equations = []
    pos = 0
    while True:
        start = cot_text.find(_OPEN, pos)
        stray = cot_text.find(_CLOSE, pos)
        if stray != -1 and (start == -1 or stray < start):
            raise AnnotationError(f"'>>' without '<<' at column {stray + 1}")
        if start == -1:
            return equations
        end = cot_text.find(_CLOSE, start + len(_OPEN))
        if end == -1:
            raise AnnotationError(f"'<<' at column {start + 1} is never closed")
        inner = cot_text[start + len(_OPEN) : end]
        if _OPEN in inner:
            raise AnnotationError(f"'<<' at column {start + 1} is followed by another '<<'")
        _check_equation(inner, start + 1)
        equations.append(f"{_OPEN}{inner}{_CLOSE}")
        pos = end + len(_CLOSE)


@dataclass
class ConversionReport:
    """What :func:`convert_original` did.

    Attributes:
        written: Lines written.
        failed: ``(line_no, reason)`` of the input lines not written for lack of usable annotations.
        excluded: Input lines not written because their INPUT is in an exclude file.
    """

    written: int = 0
    failed: list[tuple[int, str]] = field(default_factory=list)
    excluded: int = 0

    @property
    def total(self) -> int:
        """Input lines seen."""
        return self.written + len(self.failed) + self.excluded

    def summary(self) -> str:
        """One line: counts, and the first failures."""
        text = f"wrote {self.written} of {self.total} lines; {len(self.failed)} failed"
        if self.excluded:
            text += f"; {self.excluded} excluded"
        if self.failed:
            shown = "; ".join(f"line {n}: {why}" for n, why in self.failed[:3])
            more = f"; ... {len(self.failed) - 3} more" if len(self.failed) > 3 else ""
            text += f" ({shown}{more})"
        return text


def _convert(example: Example) -> Example:
    """Returns the example with an equation-only COT (possibly empty)."""
    return Example(example.input, " ".join(equations_from_annotated(example.cot)), example.answer)


def convert_original(
    in_path: str | Path,
    out_path: str | Path,
    *,
    exclude_paths: Iterable[str | Path] = (),
    keep_unannotated: bool = False,
) -> ConversionReport:
    """Converts an original-format GSM8K file to the equation-only format.

    Lines whose solution has no annotation, or an annotation that cannot be parsed, are not
    written; each is reported with its line number and reason.

    Args:
        in_path: ``QUESTION||SOLUTION #### ANSWER`` lines.
        out_path: Output file.
        exclude_paths: Data files whose INPUTs must not be written (e.g. the validation set).
        keep_unannotated: Write lines without annotations with an empty COT, as ``valid.txt``
            does, instead of reporting them.

    Raises:
        DataFormatError: If the input file itself is malformed (not UTF-8, a line without
            ``||`` or ``####``, ...), or no line at all could be converted.
    """
    exclude: set[str] = set()
    for path in exclude_paths:
        exclude |= read_inputs(path)
    report = ConversionReport()
    converted = []
    for line_no, example in enumerate(read_examples(in_path, allow_empty_cot=True), start=1):
        if example.input in exclude:
            report.excluded += 1
            continue
        try:
            result = _convert(example)
        except AnnotationError as err:
            report.failed.append((line_no, str(err)))
            continue
        if not result.cot and not keep_unannotated:
            report.failed.append((line_no, "no <<expr=value>> annotation in the solution"))
            continue
        converted.append(result)
    if not converted:
        raise DataFormatError(f"no line could be converted ({report.summary()})", in_path)
    report.written = write_examples(out_path, converted)
    return report
