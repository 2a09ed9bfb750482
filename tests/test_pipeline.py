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
from icot.errors import ConfigError, DataFormatError, IcotInputError
from icot.pipeline import (
    check_data,
    digit_curves,
    evaluate_methods,
    kd_stages,
    plot_by_size,
    plot_stepwise,
    results_markdown,
    run_pipeline,
    stages_for,
    stepwise_validations,
    task_title,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def _methods(config, methods, from_teacher=True):
    return dataclasses.replace(config, methods=methods, si=dataclasses.replace(config.si, from_teacher=from_teacher))


def test_stages_for_methods():
    config = load_config()
    assert stages_for(_methods(config, ["nocot"])) == ["nocot"]
    assert stages_for(_methods(config, ["explicit"])) == ["teacher"]
    assert stages_for(_methods(config, ["icot-kd", "nocot"])) == ["teacher", "nocot", "student", "emulator", "couple"]
    assert stages_for(_methods(config, ["icot-si"])) == ["teacher", "stepwise"]
    assert stages_for(_methods(config, ["icot-si"], False)) == ["stepwise"]  # from scratch: no teacher
    assert stages_for(_methods(config, ["explicit", "icot-si"], False)) == ["teacher", "stepwise"]


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


@pytest.mark.slow
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
                       "icot-kd-batched", "icot-si", "icot-si-batched"]
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

    # A second run with the same config skips every stage; a changed couple section reruns only couple. A finished
    # stage is reused whatever precision it trained in and whether it was compiled (the teacher's differ here).
    capsys.readouterr()
    assert main(args + ["--couple.lr", "2e-3", "--teacher.mixed_precision", "bf16", "--teacher.compile", "true"]) == 0
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
    alone = results_markdown({**results, "rows": results["rows"][1:]})  # no no-CoT row to compare with
    assert "| icot-kd | 100.0% | 40.0 | 1 | - |" in alone
    assert "Time:" not in table and "weights" not in table  # results written before those fields existed

    results.update(eval_seconds=120.0, compute_seconds=720.0, wall_seconds=300.0,
                   machine={"cpu_count": 16, "device": "NVIDIA H200", "dtype": "bfloat16"})
    table = results_markdown(results)
    assert "device NVIDIA H200 (bfloat16 weights)." in table
    assert "Time: stages 10.0 min + evaluation 2.0 min = 12.0 min; this invocation's wall time 5.0 min." in table


def test_results_markdown_stage_rows_say_units_counts_and_why_they_stopped():
    best = {"accuracy": 0.995, "exact_examples": 200.0, "loss": 0.0044, "examples": 500.0, "token_accuracy": 0.99,
            "step": 3000}
    results = {"rows": [], "test": "runs/x/data/test.txt", "seed": 0, "commit": "abc",
               "machine": {"cpu_count": 2, "device": "cpu"},
               "stages": {"teacher": {"skipped": False, "seconds": 600.0, "steps": 3000, "examples": 96000,
                                      "best": best, "stopped_by": "max_steps"}}}
    table = results_markdown(results)
    assert ("| teacher | 10.0 | 3000 | 96000 | max_steps | exact match 99.5% of 200 lines, validation loss 0.0044 on "
            "500 lines, step 3000 |") in table
    assert "0.995" not in table  # percent only


def test_task_title_names_the_task_not_the_data_folder():
    generated = {"test": "runs/x/data/test.txt", "config": {"data": {"generate": {"digits": 3, "digits_b": 0}}}}
    assert task_title(generated) == "3x3 multiplication"
    assert task_title({"test": "../shared/data/mult/4x4/valid.txt", "config": {"data": {"generate": None}}}) == "4x4"
    assert task_title({"test": "runs/x/data/test.txt"}) == "test"


def test_configs_in_repo_load():
    for path in sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "benchmarks").glob("*.yaml")):
        load_config(path)


@pytest.mark.parametrize("bad_line, problem", [
    ("1 2 * 3 x||3 6 #### 3 6", "not in the model.s vocabulary"),  # a symbol the training file lacks
    ("1 2 * 3 4 #### 3 6", "[|][|]"),                               # no CoT separator
])
def test_pipeline_checks_the_test_file_before_the_first_stage(tiny_config, tmp_path, bad_line, problem):
    test = tmp_path / "test.txt"
    good = Path(tiny_config.data.valid).read_text(encoding="utf-8").splitlines()[:2]
    test.write_text("\n".join([*good, bad_line]) + "\n", encoding="utf-8")
    config = dataclasses.replace(tiny_config, methods=["explicit"],
                                 data=dataclasses.replace(tiny_config.data, test=str(test)))
    with pytest.raises(DataFormatError, match=problem) as info:
        run_pipeline(config, tmp_path / "run", progress=False)
    assert str(info.value).startswith(f"{test}:3: ")
    assert not (tmp_path / "run" / "teacher").exists()  # nothing trained


def test_pipeline_checks_test_prompts_fit_the_context_before_training(tiny_config, tmp_path):
    config = dataclasses.replace(tiny_config, methods=["explicit"],
                                 model=dataclasses.replace(tiny_config.model, n_positions=4))
    with pytest.raises(DataFormatError, match="no room to answer") as info:
        check_data(config)
    assert str(info.value).startswith(f"{config.data.test}:1: ")


def test_results_markdown_and_plot_by_operand_size(tmp_path):
    rows = [{"method": "no-cot", "size": "3x3", "n": 50, "accuracy": 0.1},
            {"method": "no-cot", "size": "4x4", "n": 50, "accuracy": 0.0},
            {"method": "icot-si", "size": "3x3", "n": 50, "accuracy": 0.96},
            {"method": "icot-si", "size": "4x4", "error": "no room to answer"}]
    results = {"rows": [], "stages": {}, "test": "t.txt", "seed": 0, "commit": "abc",
               "machine": {"cpu_count": 2, "device": "cpu"}, "by_size": rows}
    table = results_markdown(results)
    assert "| method | 3x3 | 4x4 |" in table and "| icot-si | 96.0% | - |" in table and "| no-cot | 10.0% | 0.0% |" in table
    assert "50 generated problems per size" in table
    plot_by_size(rows, tmp_path / "by_size.png", "3x3 multiplication")
    assert (tmp_path / "by_size.png").stat().st_size > 1000


def test_evaluate_methods_scores_each_model_on_the_test_file_and_by_size(trained_teacher, trained_nocot,
                                                                         session_config, tmp_path):
    (tmp_path / "teacher").symlink_to(trained_teacher)
    (tmp_path / "nocot").symlink_to(trained_nocot)
    config = dataclasses.replace(session_config, methods=["nocot", "explicit"], eval=dataclasses.replace(
        session_config.eval, batched_size=10, limit=10, sizes=["2x2", "40x40"], sizes_count=10))
    rows, by_size, probes = evaluate_methods(config, tmp_path, progress=False)
    assert probes == {}  # eval.probe_lines is 0
    assert [r["method"] for r in rows] == ["no-cot", "no-cot-batched", "explicit-cot", "explicit-cot-batched"]
    assert [(r["method"], r["size"]) for r in by_size] == [("no-cot", "2x2"), ("no-cot", "40x40"),
                                                            ("explicit-cot", "2x2"), ("explicit-cot", "40x40")]
    assert all(r["n"] == 10 and r["batch_size"] == 10 for r in by_size if r["size"] == "2x2")
    assert all("no room to answer" in r["error"] for r in by_size if r["size"] == "40x40")


def test_saved_models_are_scored_beside_the_methods_under_their_own_names(trained_teacher, trained_nocot,
                                                                          session_config, tmp_path):
    (tmp_path / "nocot").symlink_to(trained_nocot)
    config = dataclasses.replace(session_config, methods=["nocot"], eval=dataclasses.replace(
        session_config.eval, batched_size=10, limit=10, saved_models=[str(trained_teacher)]))
    rows, _, _ = evaluate_methods(config, tmp_path, progress=False)
    assert [r["method"] for r in rows] == ["no-cot", "no-cot-batched", str(trained_teacher),
                                           f"{trained_teacher} batched"]
    # The saved teacher answers through its CoT, as the explicit method's row would.
    (tmp_path / "teacher").symlink_to(trained_teacher)
    explicit, _, _ = evaluate_methods(dataclasses.replace(config, methods=["explicit"], eval=dataclasses.replace(
        config.eval, saved_models=[])), tmp_path, progress=False)
    assert rows[2]["accuracy"] == explicit[0]["accuracy"] and rows[2]["n"] == 10


def test_pipeline_checks_saved_models_before_the_first_stage(tiny_config, tmp_path):
    missing = tmp_path / "nowhere"
    config = dataclasses.replace(tiny_config, methods=["nocot"],
                                 eval=dataclasses.replace(tiny_config.eval, saved_models=[str(missing)]))
    with pytest.raises(IcotInputError, match="nowhere"):
        run_pipeline(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "nocot").exists()  # nothing trained


def test_saved_models_entries_are_checked_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"eval.saved_models\[0\]"):
        load_config(None, {"eval": {"saved_models": [" "]}})


def test_pipeline_adds_the_probe_summary_to_results_md(tiny_config, tmp_path):
    config = dataclasses.replace(tiny_config, methods=["nocot", "explicit"], eval=dataclasses.replace(
        tiny_config.eval, probe_lines=200, limit=30))
    results = run_pipeline(config, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert set(results["probes"]) == {"no-cot", "explicit-cot"}
    for method, summary in results["probes"].items():
        saved = json.loads((run / "probes" / f"{method}.json").read_text())
        assert saved["train"] == 200 and saved["test"] == 30 and saved["size"] == "2x2" and saved["layers"] == 3
        assert summary["r2"] == [max(col) for col in zip(*saved["r2"])]
        assert len(summary["cot"]) == 4 and summary["cot_chance"] == saved["cot"]["column_chance"]
        assert (run / "probes" / f"{method}.png").stat().st_size > 1000
    table = (run / "results.md").read_text()
    assert "Linear probes" in table and "fitted on 200 training lines, scored on 30 test lines" in table
    assert "| method | k=0 | k=1 | k=2 | k=3 |" in table
    nocot = results["probes"]["no-cot"]
    assert f"| no-cot | {nocot['r2'][0]:.2f} / {100 * nocot['cot'][0]:.0f}% |" in table
    assert "| explicit-cot |" in table and "| chance (CoT) |" in table
    assert json.loads((run / "results.json").read_text())["probes"]["explicit-cot"]["r2"] == \
        results["probes"]["explicit-cot"]["r2"]


@pytest.mark.parametrize("good, test_line, problem", [
    (1, "1 2 * 3 4|| #### 8 0 4 0", ":2: no CoT: the probes"),                   # no CoT for the probes to read
    (1, "1 2 3 * 4 5||x #### 1 2 3", ":2: a 3x2 problem among 2x2 ones"),       # two sizes in the test file
    (0, "1 2 3 * 4 5||x #### 1 2 3", ": the test problems are not 2x2 like the"),  # another size than training
])
def test_pipeline_checks_the_probe_lines_before_the_first_stage(tiny_config, tmp_path, good, test_line, problem):
    test = tmp_path / "test.txt"
    good = Path(tiny_config.data.valid).read_text(encoding="utf-8").splitlines()[:good]
    test.write_text("\n".join([*good, test_line]) + "\n", encoding="utf-8")
    config = dataclasses.replace(tiny_config, methods=["nocot"], data=dataclasses.replace(tiny_config.data, test=str(test)),
                                 eval=dataclasses.replace(tiny_config.eval, probe_lines=50))
    with pytest.raises(DataFormatError, match=problem) as info:
        run_pipeline(config, tmp_path / "run", progress=False)
    assert str(info.value).startswith(f"{test}:")
    assert not (tmp_path / "run" / "nocot").exists()  # nothing trained


def test_results_markdown_kd_stage_table():
    digits = [1.0, 0.5, 0.25, 0.0]
    rows = [{"method": "icot-kd", "accuracy": 0.0, "examples_per_second": 5.0, "batch_size": 1, "n": 4,
             "digit_accuracy": [0.5, 0.25, 0.0, 0.0]}]
    results = {"rows": rows, "stages": {}, "test": "t.txt", "seed": 0, "commit": "abc",
               "machine": {"cpu_count": 2, "device": "cpu"},
               "kd_stages": {"student_with_teacher_states": {"accuracy": 0.75, "digit_accuracy": digits, "n": 4},
                             "emulator_then_student": {"accuracy": 0.25, "digit_accuracy": digits, "n": 4},
                             "emulator_r2": [None, 0.5, 0.875]}}
    table = results_markdown(results)
    assert "| student on the teacher's states (ceiling) | 75.0% | 100% | 50% | 25% | 0% |" in table
    assert "| emulator -> student, before coupling | 25.0% |" in table
    assert "| coupled (icot-kd) | 0.0% | 50% | 25% | 0% | 0% |" in table
    assert "| - | 0.500 | 0.875 |" in table
    curves = digit_curves({**results, "config": {"eval": {"batch_size": 1}}})
    assert list(curves) == ["icot-kd", "student on teacher states", "emulator -> student (uncoupled)"]
    skipped = results_markdown({**results, "kd_stages": {"skipped": "t.txt:3 has no CoT"}})
    assert "ICoT-KD stage by stage: not measured (t.txt:3 has no CoT)." in skipped


def test_kd_stages_are_not_measured_on_a_test_file_without_cot(tiny_config, tmp_path):
    test = tmp_path / "test.txt"
    test.write_text("1 2 * 3 4||3 6 0 #### 3 6 0 0\n5 6 * 7 8|| #### 5 3 0 4\n")
    config = dataclasses.replace(tiny_config, data=dataclasses.replace(tiny_config.data, test=str(test)))
    assert kd_stages(config, tmp_path / "run", progress=False) == {
        "skipped": f"{test}:2: no CoT: the student's ceiling reads the teacher's states of the reference CoT"}


def test_kd_stages_are_not_measured_when_the_teacher_cannot_read_the_test_cot(kd_config, trained_teacher, student_dir,
                                                                               emulator_dir, tmp_path):
    """A 4x4 test file for 2x2 models (as the smoke config runs): its CoT has symbols the vocabulary lacks. The
    methods' rows never read it, so the pipeline reports the stage table as not measured instead of failing."""
    run = tmp_path / "run"
    run.mkdir()
    for name, directory in (("teacher", trained_teacher), ("student", student_dir), ("emulator", emulator_dir)):
        (run / name).symlink_to(directory)
    config = dataclasses.replace(kd_config, data=dataclasses.replace(kd_config.data, test=str(
        SHARED / "data" / "mult" / "4x4" / "valid.txt")))
    kd = kd_stages(config, run, progress=False)
    assert "valid.txt:1" in kd["skipped"] and "vocabulary" in kd["skipped"]


def test_results_markdown_probe_table_without_a_cot_probe():
    probes = {"icot-kd": {"r2": [0.99, 0.5], "cot": [0.9, None], "cot_chance": [0.25, None], "train": 100, "test": 20},
              "no-cot": {"r2": [0.98, 0.25], "cot": None, "cot_chance": None, "train": 100, "test": 20}}
    results = {"rows": [], "stages": {}, "test": "t.txt", "seed": 0, "commit": "abc",
               "machine": {"cpu_count": 2, "device": "cpu"}, "probes": probes}
    table = results_markdown(results)
    assert "| icot-kd | 0.99 / 90% | 0.50 |" in table and "| no-cot | 0.98 | 0.25 |" in table
    assert "| chance (CoT) | 25% | - |" in table


@pytest.mark.slow
def test_pipeline_probes_the_implicit_model(tmp_path):
    """ICoT-KD end to end on the smoke config: its probe reads the student on the emulated states."""
    config = load_config(ROOT / "configs" / "smoke.yaml", {"data": {"test": "", "generate": {"test_count": 24}},
                                                          "eval": {"probe_lines": 128, "batched_size": 0},
                                                          "methods": ["icot-kd"]})
    results = run_pipeline(config, tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "probes" / "icot-kd.json").read_text())
    assert saved["layers"] == 3 and saved["test"] == 16 and saved["cot"]["column_accuracy"]
    assert results["probes"]["icot-kd"]["r2"] == [max(col) for col in zip(*saved["r2"])]
    table = (tmp_path / "run" / "results.md").read_text()
    assert "| icot-kd | " in table
    # ICoT-KD stage by stage: the student's ceiling, the uncoupled pair, the coupled model, the emulator's R².
    kd = results["kd_stages"]
    assert kd["student_with_teacher_states"]["n"] == 16 and len(kd["emulator_r2"]) == 2
    assert "| student on the teacher's states (ceiling) |" in table and "| coupled (icot-kd) |" in table
    assert "| emulator -> student, before coupling |" in table and "| l=0 | l=1 |" in table
    assert (tmp_path / "run" / "accuracy_by_digit.png").stat().st_size > 1000


def test_pipeline_checks_training_lines_fit_the_context_before_training(tiny_config, tmp_path):
    """An over-long training line is a FILE:LINE error before any stage, never a silent truncation; with only
    the no-CoT method, the shorter no-CoT layout is what must fit."""
    from icot.tokenizer import Layout
    from icot.training.causal_lm import load_split, starting_tokenizer

    train = load_split(tiny_config, "train")
    layout = Layout(starting_tokenizer(tiny_config, train))
    explicit = [len(e.ids) for e in layout.encode_all(train, True)]
    nocot = max(len(e.ids) for e in layout.encode_all(train, False))
    longest = max(explicit)
    config = dataclasses.replace(tiny_config, methods=["explicit"],
                                 model=dataclasses.replace(tiny_config.model, n_positions=longest - 1))
    with pytest.raises(ConfigError, match="never truncated") as info:
        check_data(config)
    assert str(info.value).startswith(f"{config.data.train}:{explicit.index(longest) + 1}: ")
    assert f"longest line of this file is {longest} tokens" in str(info.value)
    assert not (tmp_path / "run").exists()
    # The no-CoT layout of the same lines fits.
    check_data(dataclasses.replace(config, methods=["nocot"],
                                   model=dataclasses.replace(tiny_config.model, n_positions=max(nocot, 16))))
