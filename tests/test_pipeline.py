"""``icot pipeline`` end to end on the smoke config, and its resume-by-skipping behaviour."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch

from icot.cli import main
from icot.config import load_config
from icot.pipeline import plot_stepwise, results_markdown, stage_depends, stages_for, stepwise_validations

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def test_stages_for_methods():
    assert stages_for(["nocot"]) == ["nocot"]
    assert stages_for(["explicit"]) == ["teacher"]
    assert stages_for(["icot-kd", "nocot"]) == ["teacher", "nocot", "student", "emulator", "couple"]
    assert stages_for(["icot-si"]) == ["teacher", "stepwise"]
    assert stages_for(["icot-si"], si_from_teacher=False) == ["stepwise"]  # from scratch: no teacher
    assert stages_for(["explicit", "icot-si"], si_from_teacher=False) == ["teacher", "stepwise"]
    config = load_config()
    assert "teacher" in stage_depends("stepwise", config)
    scratch = dataclasses.replace(config, si=dataclasses.replace(config.si, from_teacher=False))
    assert "teacher" not in stage_depends("stepwise", scratch) and "si" in stage_depends("stepwise", scratch)
    assert stage_depends("student", scratch) == stage_depends("student", config)


def test_stepwise_curve_reads_validations_and_plots(tmp_path):
    records = [{"event": "train", "step": 1, "examples": 32, "loss": 1.0},
               {"event": "validate", "step": 2, "examples": 64, "val_cot_removed": 0.0, "val_accuracy": 0.5,
                "val_token_accuracy": 0.9},
               {"event": "optimizer_reset", "step": 3},
               {"event": "validate", "step": 4, "examples": 128, "val_cot_removed": 1.0, "val_accuracy": 0.25,
                "val_token_accuracy": 0.8}]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    vals = stepwise_validations(metrics)
    assert [v["step"] for v in vals] == [2, 4]
    plot_stepwise({"a": metrics, "b": metrics}, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smoke_pipeline_end_to_end_and_resume(tmp_path, capsys):
    run = tmp_path / "run"
    test_file = SHARED / "data" / "mult" / "4x4" / "valid.txt"
    args = ["pipeline", str(ROOT / "configs" / "smoke.yaml"), "--out", str(run), "--data.test", str(test_file)]
    start = time.monotonic()
    assert main(args) == 0
    assert time.monotonic() - start < 120, "the smoke pipeline must stay under two minutes"

    results = json.loads((run / "results.json").read_text())
    methods = [r["method"] for r in results["rows"]]
    assert methods == ["no-cot", "no-cot-batched", "explicit-cot", "explicit-cot-batched", "icot-kd",
                       "implicit-batched", "icot-si", "icot-si-batched"]
    for row in results["rows"]:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["examples_per_second"] > 0 and row["n"] == 16
    assert set(results["stages"]) == {"teacher", "nocot", "student", "emulator", "couple", "stepwise"}
    table = (run / "results.md").read_text()
    assert "| icot-kd |" in table and "| explicit-cot |" in table
    assert (run / "accuracy_vs_speed.png").stat().st_size > 1000
    assert (run / "implicit" / "icot.json").is_file()
    # Generated data excludes every test input.
    test_inputs = {line.split("||")[0] for line in test_file.read_text().splitlines()}
    train_inputs = {line.split("||")[0] for line in (run / "data" / "train.txt").read_text().splitlines()}
    assert not test_inputs & train_inputs

    # A second run with the same config skips every stage; a changed couple section reruns only couple.
    capsys.readouterr()
    assert main(args + ["--couple.lr", "2e-3"]) == 0
    out = capsys.readouterr().out
    for name in ("teacher", "nocot", "student", "emulator", "stepwise"):
        assert f"stage {name}: already done" in out
    assert "stage couple: already done" not in out
    again = json.loads((run / "results.json").read_text())
    assert again["stages"]["teacher"]["skipped"] and not again["stages"]["couple"]["skipped"]
    # The cost of the whole run counts the reused stages' own seconds, not only this invocation's.
    stage_seconds = sum(s["seconds"] for s in again["stages"].values())
    assert stage_seconds > again["stages"]["couple"]["seconds"] > 0
    assert again["compute_seconds"] == pytest.approx(stage_seconds + again["eval_seconds"])
    assert again["machine"]["dtype"] == "float32"
    assert again["machine"]["device"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")


def test_results_markdown_ratio_to_nocot():
    results = {"rows": [{"method": "no-cot", "accuracy": 0.5, "examples_per_second": 50.0, "batch_size": 1, "n": 4},
                        {"method": "icot-kd", "accuracy": 1.0, "examples_per_second": 40.0, "batch_size": 1, "n": 4}],
               "stages": {}, "test": "t.txt", "seed": 0, "commit": "abc", "machine": {"cpu_count": 2, "device": "cpu"}}
    table = results_markdown(results)
    assert "| icot-kd | 100.0% | 40.0 | 1 | 0.80x |" in table
    assert "Time:" not in table and "weights" not in table  # results written before those fields existed

    results.update(eval_seconds=120.0, compute_seconds=720.0, wall_seconds=300.0,
                   machine={"cpu_count": 16, "device": "NVIDIA H200", "dtype": "bfloat16"})
    table = results_markdown(results)
    assert "device NVIDIA H200 (bfloat16 weights)." in table
    assert "Time: stages 10.0 min + evaluation 2.0 min = 12.0 min; this invocation's wall time 5.0 min." in table


def test_configs_in_repo_load():
    for path in sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "benchmarks").glob("*.yaml")):
        load_config(path)
