"""Nothing in the package can run code from a file it loads: weights in safetensors, configs and state in
JSON or YAML read with ``safe_load``; no pickle, no ``torch.load``."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# Loaders that can execute code stored in a file, or switch such a loader on.
UNSAFE = [r"torch\.load", r"pickle", r"\bdill\b", r"\bmarshal\b", r"\bjoblib\b", r"np\.load\(", r"allow_pickle",
          r"weights_only\s*=\s*False", r"yaml\.load\(", r"yaml\.unsafe_load", r"\bsave_state\(", r"\bload_state\(",
          r"use_safetensors\s*=\s*False"]


@pytest.mark.skipif(shutil.which("grep") is None, reason="needs grep")
def test_grep_finds_no_torch_load_or_pickle():
    # The code, not packaging metadata (an installed egg-info copies README.md, which explains why there
    # is no pickle).
    found = subprocess.run(["grep", "-rn", "--include=*.py", r"torch.load\|pickle", str(SRC)],
                           capture_output=True, text=True)
    assert found.returncode == 1 and found.stdout == "", found.stdout  # 1: no line matched


def test_no_unsafe_loader_in_the_package():
    hits = [f"{path}:{n}: {line.strip()}"
            for path in sorted(SRC.rglob("*.py"))
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
            if any(re.search(p, line) for p in UNSAFE)]
    assert hits == []

