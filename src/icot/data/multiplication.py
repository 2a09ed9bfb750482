"""Multi-digit multiplication in the papers' format, and training-file generation.

A line for ``a * b`` (``N x M`` digits) writes every number least significant digit first,
digits separated by spaces::

    9 1 7 3 * 9 4 3 3||1 7 4 3 3 + 0 6 7 8 4 1 ( 1 3 2 2 8 1 ) + ... #### 1 3 9 4 5 4 2 1

The j-th partial product ``a * b_j * 10^j`` is padded to ``N + 1 + j`` digits, the running sum
after it (for ``0 < j < M - 1``) follows in parentheses with the same width, and the answer is
padded to ``N + M`` digits. Operands have exactly ``N`` and ``M`` digits (no leading zero): none
of the 10,000 operands in the papers' validation files starts with a zero.

:func:`make_example` is the readable reference; :func:`generate_examples` builds the same lines
for many pairs at once with numpy (every line of one size has the same length, so the lines are
rows of one byte matrix).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from numbers import Integral
from pathlib import Path

import numpy as np

from icot.data import parse_line, read_inputs, read_lines
from icot.errors import DataFormatError

__all__ = [
    "check_file",
    "format_input",
    "generate_examples",
    "make_example",
    "parse_input",
    "write_training_file",
]

_DIGITS = frozenset("0123456789")
_ASCII_ZERO = ord("0")
_ASCII_SPACE = ord(" ")
_BLOCK_ROWS = 65536


# --- the reference, one example at a time -------------------------------------------------------


def _reversed_digits(value: int, width: int) -> str:
    """Writes ``value`` least significant digit first, zero-padded to ``width``, space separated."""
    text = str(value).zfill(width)
    assert len(text) == width, (value, width)  # widths are exact bounds, see make_example
    return " ".join(reversed(text))


def _check_operand(name: str, value: int, digits: int) -> int:
    """Checks that ``value`` is an integer with exactly ``digits`` digits."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(digits, bool) or not isinstance(digits, Integral) or digits < 1:
        raise ValueError(f"digits_{name} must be a positive integer, got {digits!r}")
    value = int(value)
    if not 10 ** (digits - 1) <= value < 10**digits:
        raise ValueError(
            f"{name}={value} does not have exactly {digits} digits "
            f"(expected {10 ** (digits - 1)}..{10**digits - 1}; a leading zero is not allowed)"
        )
    return value


def format_input(a: int, b: int, digits_a: int, digits_b: int) -> str:
    """Returns the INPUT part ``a * b`` (digits reversed, space separated)."""
    a = _check_operand("a", a, digits_a)
    b = _check_operand("b", b, digits_b)
    return f"{_reversed_digits(a, digits_a)} * {_reversed_digits(b, digits_b)}"


def make_example(a: int, b: int, digits_a: int, digits_b: int) -> str:
    """Returns the data line for ``a * b`` exactly as in the papers' files.

    Args:
        a: First operand, exactly ``digits_a`` digits.
        b: Second operand, exactly ``digits_b`` digits.
        digits_a: N.
        digits_b: M.

    Raises:
        ValueError: If an operand does not have exactly its number of digits.
    """
    head = format_input(a, b, digits_a, digits_b)
    n, m = digits_a, digits_b
    steps = []
    running = 0
    for j in range(m):
        b_j = (b // 10**j) % 10
        partial = a * b_j * 10**j  # < 10^(n + 1 + j)
        running += partial  # = a * (b mod 10^(j+1)) < 10^(n + 1 + j)
        step = _reversed_digits(partial, n + 1 + j)
        if 0 < j < m - 1:
            step += f" ( {_reversed_digits(running, n + 1 + j)} )"
        steps.append(step)
    return f"{head}||{' + '.join(steps)} #### {_reversed_digits(a * b, n + m)}"


def parse_input(text: str) -> tuple[int, int, int, int]:
    """Inverse of :func:`format_input`: returns ``(a, b, digits_a, digits_b)``.

    Raises:
        DataFormatError: (a ``ValueError``) if the text is not ``DIGITS * DIGITS`` with
            single-digit, space-separated symbols.
    """
    tokens = text.split()
    if tokens.count("*") != 1:
        raise DataFormatError(f"expected exactly one '*' in multiplication input {text!r}")
    star = tokens.index("*")
    left, right = tokens[:star], tokens[star + 1 :]
    if not left or not right:
        raise DataFormatError(f"missing operand around '*' in multiplication input {text!r}")
    bad = [tok for tok in left + right if tok not in _DIGITS]
    if bad:
        raise DataFormatError(
            f"non-digit symbol {bad[0]!r} in multiplication input {text!r} "
            "(expected single digits separated by spaces)"
        )
    # Digits are written least significant first.
    a = int("".join(reversed(left)))
    b = int("".join(reversed(right)))
    return a, b, len(left), len(right)


def check_line(line: str, path: str | Path | None = None, line_no: int | None = None) -> None:
    """Refuse a line whose COT or ANSWER does not follow from its INPUT (compared with :func:`make_example`).

    Raises:
        DataFormatError: naming ``path``, ``line_no`` and the first part that differs.
    """
    example = parse_line(line, path, line_no)
    try:
        a, b, digits_a, digits_b = parse_input(example.input)
        expected = parse_line(make_example(a, b, digits_a, digits_b))
    except ValueError as e:  # DataFormatError included: not a multiplication, or a leading zero
        raise DataFormatError(e.problem if isinstance(e, DataFormatError) else str(e), path, line_no) from None
    for part in ("cot", "answer"):
        got, want = getattr(example, part), getattr(expected, part)
        if got != want:
            raise DataFormatError(f"{part.upper()} does not follow from INPUT {example.input!r}: expected {want!r}, "
                                  f"got {got!r}", path, line_no)


def check_file(path: str | Path) -> tuple[int, list[DataFormatError]]:
    """Check every line of a multiplication data file with :func:`check_line`.

    Returns:
        ``(lines checked, one error per bad line)``; a file that cannot be read at all raises instead.
    """
    lines = read_lines(path)
    problems = []
    for line_no, line in enumerate(lines, start=1):
        try:
            check_line(line, path, line_no)
        except DataFormatError as e:
            problems.append(e)
    return len(lines), problems


# --- many examples at once ----------------------------------------------------------------------


def _operand_key(digits_a: int, digits_b: int, text: str) -> bytes | None:
    """Returns the pair key of an INPUT that this size could generate, else None.

    The key is the INPUT's digits as bytes (a's then b's, least significant first), which is how
    generated pairs are keyed too.
    """
    try:
        a, b, n, m = parse_input(text)
        if (n, m) != (digits_a, digits_b):
            return None
        canonical = format_input(a, b, n, m)
    except ValueError:
        return None  # another task's input, or a leading zero: never generated, cannot collide
    if canonical != text:
        return None  # e.g. other spacing: a generated INPUT can never equal it
    return bytes(int(tok) for tok in text.split() if tok != "*")


def _space_size(digits_a: int, digits_b: int) -> int:
    """Number of distinct pairs of an N-digit and an M-digit number."""
    return 9 * 10 ** (digits_a - 1) * 9 * 10 ** (digits_b - 1)


def _random_operands(rng: np.random.Generator, size: int, digits: int) -> np.ndarray:
    """Draws uniform ``digits``-digit numbers as (size, digits) uint8, least significant first."""
    out = rng.integers(0, 10, size=(size, digits), dtype=np.uint8)
    out[:, -1] = rng.integers(1, 10, size=size, dtype=np.uint8)  # no leading zero
    return out


def _rows_as_keys(matrix: np.ndarray) -> list[bytes]:
    """Returns each row of a uint8 matrix as bytes (hashable, for de-duplication)."""
    matrix = np.ascontiguousarray(matrix)
    return matrix.view(f"V{matrix.shape[1]}").ravel().tolist()


def _sample_pairs(digits_a, digits_b, count, rng, excluded: set[bytes]) -> np.ndarray:
    """Rejection-samples ``count`` distinct pairs not in ``excluded`` (sparse spaces)."""
    seen = set(excluded)
    chunks, have = [], 0
    while have < count:
        need = count - have
        size = need + need // 8 + 64  # a little extra: a few draws collide or are excluded
        pairs = np.concatenate(
            [_random_operands(rng, size, digits_a), _random_operands(rng, size, digits_b)], axis=1
        )
        keep = []
        for i, key in enumerate(_rows_as_keys(pairs)):
            if key not in seen:
                seen.add(key)
                keep.append(i)
                if len(keep) == need:
                    break
        chunks.append(pairs[keep])
        have += len(keep)
    return np.concatenate(chunks, axis=0)


def _int_digits(values: np.ndarray, digits: int) -> np.ndarray:
    """Splits int64 values into a (len, digits) uint8 array, least significant first."""
    powers = 10 ** np.arange(digits, dtype=np.int64)
    return ((values[:, None] // powers) % 10).astype(np.uint8)


def _enumerate_pairs(digits_a, digits_b, count, rng, excluded: set[bytes]) -> np.ndarray:
    """Draws ``count`` pairs without replacement from a small space by shuffling all of it.

    Rejection sampling would slow down badly when most of the space is needed.
    """
    n_b = 9 * 10 ** (digits_b - 1)
    order = rng.permutation(_space_size(digits_a, digits_b))
    a = 10 ** (digits_a - 1) + order // n_b
    b = 10 ** (digits_b - 1) + order % n_b
    pairs = np.concatenate([_int_digits(a, digits_a), _int_digits(b, digits_b)], axis=1)
    if excluded:
        keys = _rows_as_keys(pairs)
        pairs = pairs[[i for i, key in enumerate(keys) if key not in excluded]]
    return pairs[:count]


def _carry(columns: np.ndarray) -> np.ndarray:
    """Propagates carries in a (rows, width) array of column sums; returns uint8 digits.

    The caller guarantees that the value fits in ``width`` digits.
    """
    digits = np.empty(columns.shape, dtype=np.uint8)
    carry = np.zeros(columns.shape[0], dtype=np.int32)
    for k in range(columns.shape[1]):
        total = columns[:, k] + carry
        digits[:, k] = total % 10
        carry = total // 10
    assert not carry.any(), "value wider than its padding"
    return digits


def _pad(digits: np.ndarray, low: int, width: int) -> np.ndarray:
    """Shifts digits up by ``low`` places (times 10^low) and zero-pads them to ``width``."""
    out = np.zeros((digits.shape[0], width), dtype=np.int32)
    out[:, low : low + digits.shape[1]] = digits
    return out


def _spaced(digits: np.ndarray) -> np.ndarray:
    """Renders a (rows, k) digit array as ASCII ``d d d`` (rows, 2k - 1)."""
    out = np.full((digits.shape[0], 2 * digits.shape[1] - 1), _ASCII_SPACE, dtype=np.uint8)
    out[:, 0::2] = digits + _ASCII_ZERO
    return out


def _lines_matrix(pairs: np.ndarray, digits_a: int, digits_b: int) -> np.ndarray:
    """Builds every line (plus a newline) of the given pairs as one (rows, length) byte matrix."""
    n, m = digits_a, digits_b
    a, b = pairs[:, :n].astype(np.int32), pairs[:, n:].astype(np.int32)
    rows = pairs.shape[0]

    def const(text: str) -> np.ndarray:
        row = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
        return np.broadcast_to(row, (rows, len(text)))

    parts = [_spaced(pairs[:, :n]), const(" * "), _spaced(pairs[:, n:]), const("||")]
    running = np.zeros((rows, n + m), dtype=np.int32)
    for j in range(m):
        width = n + 1 + j
        partial = _carry(_pad(a * b[:, j : j + 1], j, width))  # a * b_j * 10^j
        running = _carry(_pad(running[:, : width - 1], 0, width) + partial)
        if j > 0:
            parts.append(const(" + "))
        parts.append(_spaced(partial))
        if 0 < j < m - 1:
            parts += [const(" ( "), _spaced(running), const(" )")]
    parts += [const(" #### "), _spaced(running), const("\n")]  # the last running sum is a * b
    return np.concatenate(parts, axis=1)


# 808k lines of 11x11 hold 18 MB of operand digits; this bound only stops requests that cannot fit.
MAX_TABLE_BYTES = 4 * 2**30


def _check_request(digits_a: int, digits_b: int, count: int) -> None:
    """Validates the sizes and the count."""
    for name, digits in (("digits_a", digits_a), ("digits_b", digits_b)):
        if isinstance(digits, bool) or not isinstance(digits, Integral) or digits < 1:
            raise ValueError(f"{name} must be a positive integer, got {digits!r}")
    if isinstance(count, bool) or not isinstance(count, Integral) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    table = count * (digits_a + digits_b)  # bytes of the operand-digit table the draw holds in memory
    if table > MAX_TABLE_BYTES:
        raise ValueError(f"count {count} of {digits_a}x{digits_b} examples needs a {table / 2**30:.1f} GiB table of "
                         f"operand digits, more than the {MAX_TABLE_BYTES // 2**30} GiB allowed: write several "
                         f"files, each with --exclude of the ones before")


def _generate_pairs(digits_a, digits_b, count, seed, exclude: Iterable[str]):
    """Returns ``(pairs, n_excluded)``.

    ``pairs`` holds ``count`` distinct digit rows (a's then b's); ``n_excluded`` counts the
    excluded inputs of this size.
    """
    _check_request(digits_a, digits_b, count)
    excluded = {key for key in (_operand_key(digits_a, digits_b, t) for t in exclude) if key}
    available = _space_size(digits_a, digits_b) - len(excluded)
    if count > available:
        raise ValueError(
            f"cannot draw {count} distinct {digits_a}x{digits_b} examples: only {available} pairs "
            f"exist ({_space_size(digits_a, digits_b)} in all, {len(excluded)} excluded)"
        )
    rng = np.random.default_rng(seed)
    # Shuffle the whole space when sampling would need a large part of it.
    dense = available <= 4 * count
    sample = _enumerate_pairs if dense else _sample_pairs
    return sample(digits_a, digits_b, count, rng, excluded), len(excluded)


def _line_blocks(pairs: np.ndarray, digits_a: int, digits_b: int) -> Iterator[bytes]:
    """Yields the lines of the pairs (newline-terminated) as bytes, a block of rows at a time.

    Blocks bound the memory: 808k lines of 11x11 take 670 MB as one matrix.
    """
    for start in range(0, pairs.shape[0], _BLOCK_ROWS):
        yield _lines_matrix(pairs[start : start + _BLOCK_ROWS], digits_a, digits_b).tobytes()


def generate_examples(
    digits_a: int, digits_b: int, count: int, seed: int, exclude: Iterable[str] = ()
) -> list[str]:
    """Returns ``count`` distinct random example lines (no newline), deterministic for a seed.

    Args:
        digits_a: N, digits of the first operand.
        digits_b: M, digits of the second operand.
        count: Number of lines.
        seed: Seed of ``numpy.random.default_rng``.
        exclude: INPUT strings that must not be generated (e.g. validation inputs).

    Raises:
        ValueError: If fewer than ``count`` distinct pairs remain after the exclusion.
    """
    pairs, _ = _generate_pairs(digits_a, digits_b, count, seed, exclude)
    lines = []
    for block in _line_blocks(pairs, digits_a, digits_b):
        lines += block.decode("ascii").split("\n")[:-1]
    return lines


def write_training_file(
    out: str | Path,
    digits_a: int,
    digits_b: int,
    count: int,
    seed: int,
    exclude_paths: Iterable[str | Path] = (),
) -> dict:
    """Writes ``count`` generated lines to ``out``, excluding the INPUTs of ``exclude_paths``.

    The file is written to a temporary name and renamed, so an interrupted run leaves no
    partial file.

    Returns:
        ``{"path", "count", "digits_a", "digits_b", "seed", "exclude_paths",
        "excluded_inputs", "seconds"}``; ``excluded_inputs`` counts the distinct excluded INPUTs
        of this size (inputs of other tasks cannot collide and are not counted).
    """
    start = time.perf_counter()
    if isinstance(count, Integral) and not isinstance(count, bool) and count < 1:
        raise ValueError(f"count must be at least 1 (a data file needs examples), got {count}")
    exclude_paths = [str(p) for p in exclude_paths]
    exclude: set[str] = set()
    for path in exclude_paths:
        exclude |= read_inputs(path)
    pairs, n_excluded = _generate_pairs(digits_a, digits_b, count, seed, exclude)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as handle:
        for block in _line_blocks(pairs, digits_a, digits_b):
            handle.write(block)
    os.replace(tmp, out)
    return {
        "path": str(out),
        "count": count,
        "digits_a": digits_a,
        "digits_b": digits_b,
        "seed": seed,
        "exclude_paths": exclude_paths,
        "excluded_inputs": n_excluded,
        "seconds": round(time.perf_counter() - start, 3),
    }
