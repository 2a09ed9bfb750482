"""Tests of icot.rundir: icot.json, atomic replacement, and where a stage directory stands."""

from __future__ import annotations

import json

import pytest

from icot.errors import CheckpointError
from icot.rundir import (
    CHECKPOINT,
    STATE_FILE,
    can_resume,
    checkpoint_dir,
    model_path,
    read_meta,
    remove_checkpoints,
    save_atomically,
    stage_is_done,
    write_meta,
)


def test_meta_round_trip_and_errors(tmp_path):
    write_meta(tmp_path, {"kind": "lm", "layout": "explicit"})
    assert read_meta(tmp_path) == {"kind": "lm", "layout": "explicit"}
    with pytest.raises(CheckpointError, match="not an icot model directory"):
        read_meta(tmp_path / "missing")
    (tmp_path / "icot.json").write_text('{"layout": 1}', encoding="utf-8")
    with pytest.raises(CheckpointError, match="missing field 'kind'"):
        read_meta(tmp_path)


def test_model_path_of_a_stage_and_of_a_model_directory(tmp_path):
    write_meta(tmp_path, {"kind": "stage", "stage": "teacher", "model": "best", "status": "done"})
    assert model_path(tmp_path) == tmp_path / "best"
    (tmp_path / "best").mkdir()
    write_meta(tmp_path / "best", {"kind": "lm"})
    assert model_path(tmp_path / "best") == tmp_path / "best"
    write_meta(tmp_path, {"kind": "stage", "stage": "teacher", "status": "done"})
    with pytest.raises(CheckpointError, match="lacks field 'model'"):
        model_path(tmp_path)


def test_where_a_stage_stands(tmp_path):
    assert not stage_is_done(tmp_path) and not can_resume(tmp_path)  # not a stage directory at all
    write_meta(tmp_path, {"kind": "stage", "stage": "nocot", "model": "best", "status": "running"})
    assert not can_resume(tmp_path)  # running, but nothing to resume from
    (tmp_path / CHECKPOINT).mkdir()
    (tmp_path / CHECKPOINT / STATE_FILE).write_text(json.dumps({"format": 2}), encoding="utf-8")
    assert can_resume(tmp_path) and checkpoint_dir(tmp_path) == tmp_path / CHECKPOINT
    remove_checkpoints(tmp_path)
    assert checkpoint_dir(tmp_path) is None and not can_resume(tmp_path)
    write_meta(tmp_path, {"kind": "stage", "stage": "nocot", "model": "best", "status": "done"})
    assert stage_is_done(tmp_path)


def test_save_atomically_replaces_all_or_nothing(tmp_path):
    target = tmp_path / "best"
    save_atomically(target, lambda d: (d / "weights").write_text("one"))
    assert (target / "weights").read_text() == "one"

    def failing(d):
        (d / "weights").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_atomically(target, failing)
    assert (target / "weights").read_text() == "one"  # the previous directory is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # and no temporary is left
    save_atomically(target, lambda d: (d / "weights").write_text("two"))
    assert (target / "weights").read_text() == "two"
