"""Run and model directories on disk: their ``icot.json``, atomic replacement, and where a stage stands.

A *model directory* holds ``icot.json`` (``{"kind": ...}``) beside the weights; a *stage directory* (what
a training stage writes) holds ``icot.json`` with ``"kind": "stage"``, its ``best/`` model directory, and,
while unfinished, ``checkpoint/``. Models, evaluation, training, the pipeline and the CLI find and mark
them with these functions.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from icot.errors import CheckpointError

META_FILE = "icot.json"
BEST = "best"
CHECKPOINT = "checkpoint"
STATE_FILE = "trainer_state.json"


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ``icot.json`` of a model directory."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"not an icot model directory (no {META_FILE})", path)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"invalid JSON: {e}", meta_path) from None
    if not isinstance(meta, dict) or "kind" not in meta:
        raise CheckpointError("missing field 'kind'", meta_path)
    return meta


def write_meta(path: str | Path, meta: dict[str, Any]) -> None:
    """Write ``icot.json``."""
    Path(path, META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_atomically(out_dir: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_dir)`` and then move ``tmp_dir`` onto ``out_dir``.

    A process killed while writing leaves the previous ``out_dir`` intact (the rename is the commit).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write(tmp)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def recover_atomically(out_dir: str | Path) -> None:
    """Repair what a process killed inside :func:`save_atomically` left beside ``out_dir``.

    Killed between its two renames, only the previous directory exists, moved aside as
    ``.NAME.old-PID``: it is put back. Leftover temporary and aside directories are deleted.
    """
    out_dir = Path(out_dir)
    aside = sorted(out_dir.parent.glob(f".{out_dir.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if aside and not out_dir.exists():
        os.replace(aside.pop(), out_dir)
    for path in [*aside, *out_dir.parent.glob(f".{out_dir.name}.tmp-*")]:
        shutil.rmtree(path, ignore_errors=True)


def _stage_status(out_dir: str | Path) -> str | None:
    """The ``status`` of a stage directory, or None when ``out_dir`` is not one (or is unreadable)."""
    try:
        meta = read_meta(out_dir)
    except Exception:
        return None
    return meta.get("status") if meta.get("kind") == "stage" else None


def stage_is_done(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` holds a finished stage."""
    return _stage_status(out_dir) == "done"


def model_path(stage_dir: str | Path) -> Path:
    """The model directory inside a stage directory (the stage's best checkpoint)."""
    meta = read_meta(stage_dir)
    if meta["kind"] != "stage":
        return Path(stage_dir)
    if not isinstance(meta.get("model"), str):
        raise CheckpointError("a stage's icot.json lacks field 'model' (the model directory inside it)",
                              Path(stage_dir) / META_FILE)
    return Path(stage_dir) / meta["model"]


def can_resume(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` holds an unfinished stage with a checkpoint to continue from."""
    return _stage_status(out_dir) == "running" and checkpoint_dir(out_dir) is not None


def checkpoint_dir(out_dir: str | Path) -> Path | None:
    """The complete checkpoint of a stage directory, or None (reads only).

    ``save_atomically`` moves the old directory aside before renaming the new one into place; a kill
    between those two renames leaves only the old one, as ``.checkpoint.old-PID``, which counts then
    (:func:`recover_atomically` puts it back).
    """
    out_dir = Path(out_dir)
    if (out_dir / CHECKPOINT / STATE_FILE).is_file():
        return out_dir / CHECKPOINT
    aside = sorted(out_dir.glob(f".{CHECKPOINT}.old-*/{STATE_FILE}"), key=lambda p: p.stat().st_mtime)
    return aside[-1].parent if aside else None


def remove_checkpoints(out_dir: str | Path) -> None:
    """Delete the checkpoint of a stage directory, and what interrupted saves left (``.checkpoint.*``)."""
    out_dir = Path(out_dir)
    for path in [out_dir / CHECKPOINT, *out_dir.glob(f".{CHECKPOINT}.old-*"), *out_dir.glob(f".{CHECKPOINT}.tmp-*")]:
        shutil.rmtree(path, ignore_errors=True)
