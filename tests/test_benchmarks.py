"""The benchmark scripts' measuring functions, on tiny models (the scripts themselves run on real runs)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


probe = _script("probe_teacher_states")
profile = _script("profile_paths")
train_speed = _script("train_speed")
si_curves = _script("si_curves")
kd_curves = _script("kd_curves")
kd_ceiling = _script("kd_ceiling")


@pytest.mark.parametrize("hidden", [0, 32])
def test_probe_reads_decodable_labels_and_not_noise(hidden):
    torch.manual_seed(0)
    x = torch.randn(2000, 16)
    readable = (x @ torch.randn(16, 5)).argmax(-1)  # (N,) a label a linear map reads exactly
    noise = torch.randint(0, 5, (2000,))  # (N,) independent of x
    y = torch.stack([readable, noise], 1)  # (N, 2): two answer tokens
    fitted = probe.fit_probe(x[:1500], y[:1500], vocab=5, steps=200, seed=0, hidden=hidden)
    accuracy = (fitted(x[1500:]).argmax(-1) == y[1500:]).float().mean(0)  # (2,)
    assert accuracy[0] > 0.9
    assert accuracy[1] < 0.35  # chance is 0.2: held-out noise stays near it


def test_probe_of_a_tiny_teacher_scores_every_answer_digit(trained_teacher, session_data):
    train, valid = session_data
    args = argparse.Namespace(train=str(train), test=str(valid), train_lines=200, test_lines=40, steps=20,
                              batch_size=64, hidden=[0, 16])
    rows = probe.probe_subset(str(trained_teacher), "diagonal", args)
    assert [r["hidden"] for r in rows] == [0, 16]
    for row in rows:
        _check_row(row)


def _check_row(row: dict) -> None:
    assert len(row["digit_accuracy"]) == 4  # 2x2 answers have 4 digits
    assert all(0.0 <= a <= 1.0 for a in row["digit_accuracy"])
    assert row["answer_accuracy"] <= min(row["digit_accuracy"])
    assert (row["train_lines"], row["test_lines"], row["features"]) == (200, 40, 2 * 32)  # L * H


def test_probe_refuses_answers_of_different_lengths(trained_teacher, tmp_path, session_data):
    train, _ = session_data
    lines = train.read_text().splitlines()[:3]
    lines.append("1 2 * 3 4||4 0 1 + 0 3 6 0 #### 4 3 7")  # a 3-digit answer among 4-digit ones
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("\n".join(lines) + "\n")
    args = argparse.Namespace(train=str(mixed), test=str(mixed), train_lines=10, test_lines=10, steps=1,
                              batch_size=8, hidden=[0])
    with pytest.raises(ValueError, match="different lengths"):
        probe.probe_subset(str(trained_teacher), "diagonal", args)


def test_profile_training_times_the_loop_and_a_bare_loop(tiny_config):
    report = profile.profile_training(tiny_config, steps=3)
    assert report["steps"] == 3 and report["batch_size"] == tiny_config.teacher.batch_size
    assert report["loop_s_per_step"] > 0 and report["bare_s_per_step"] > 0
    ratio = report["loop_s_per_step"] / report["bare_s_per_step"] - 1
    assert report["loop_overhead"] == pytest.approx(ratio, abs=1e-3)


def test_median_ms_interleaves_the_calls_and_skips_warm_up():
    order = []
    calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    report = profile.median_ms(calls, repeats=3)
    assert order == ["a", "b"] * 5  # 2 warm-up rounds, then 3 measured ones, a and b alternating
    assert set(report) == {"a_ms", "b_ms"} and all(v >= 0 for v in report.values())


def test_train_flops_count_the_matmuls_of_a_gpt2():
    # 1 layer, width 4, vocabulary 10, 3 tokens: per token 24*16 + 4*3*4 (attention) + 2*4*10 (LM head).
    assert train_speed.train_flops_per_row(1, 4, 10, 3) == 3 * (24 * 16 + 4 * 3 * 4 + 2 * 4 * 10) * 3


def test_train_speed_times_the_loop_from_its_own_logs(session_data):
    train, valid = session_data
    r = train_speed.measure_stage("nocot", train, valid, (2, 32, 2), batch_size=16, steps=12, mixed_precision="no")
    assert r["stage"] == "nocot" and r["examples_per_second"] > 0 and r["gflops"] > 0
    # The timed stretch is the first to the last train log: 10 of the 12 steps (logs every 2 steps).
    assert 0 < r["timed_seconds"]
    assert train_speed.parse_shape("2x768x4") == (2, 768, 4)
    assert train_speed.matmul_peak(torch.float32, sizes=(64,), repeats=1)["gflops"] > 0


def test_train_speed_compares_with_the_higher_peak_and_skips_an_emulated_bf16(monkeypatch):
    assert train_speed.best_peak({"float32": {"gflops": 191.0}, "bfloat16": {"gflops": 814.0}}) == "bfloat16"
    assert train_speed.best_peak({"float32": {"gflops": 76.0}}) == "float32"
    measured = []
    monkeypatch.setattr(train_speed, "matmul_peak", lambda dtype: measured.append(dtype) or {"gflops": 1.0})
    assert set(train_speed.measure_peaks(1, bf16=False)) == {"float32"} and measured == [torch.float32]


def test_si_summary_splits_the_schedule_at_the_cot_s_end(tmp_path):
    records = [{"event": "validate", "step": s, "examples": 32 * s, "val_cot_removed": float(min(s, 3)),
                "val_accuracy": acc, "val_token_accuracy": 0.9, "val_eligible": float(s >= 3)}
               for s, acc in [(1, 0.5), (2, 0.25), (3, 0.0), (4, 0.75)]]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    row = si_curves.summary(metrics)
    assert row["best_exact_with_cot_left"] == 0.5 and row["best_exact_cot_gone"] == 0.75
    assert row["steps"] == 4 and row["cot_removed"] == 3.0 and row["validations"] == 4


def test_si_by_tokens_gives_each_count_its_lowest_and_last_exact_match(tmp_path):
    records = [{"event": "validate", "step": s, "examples": 32 * s, "val_cot_removed": removed,
                "val_accuracy": acc, "val_token_accuracy": 0.9}
               for s, removed, acc in [(2, 0.0, 0.5), (4, 0.0, 0.75), (6, 1.0, 0.25), (8, 1.0, 0.0), (10, 1.0, 0.5),
                                       (12, 2.0, 1.0)]]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in [{"event": "train", "step": 1}] + records))
    rows = si_curves.by_tokens(metrics)
    assert [(r["tokens_removed"], r["from_step"], r["validations"], r["lowest_exact"], r["last_exact"])
            for r in rows] == [(0.0, 2, 2, 0.5, 0.75), (1.0, 6, 3, 0.0, 0.5), (2.0, 12, 1, 1.0, 1.0)]
    table = si_curves.by_tokens_markdown("G", rows).splitlines()
    assert table[5] == "| 1 | 6 | 3 | 0.0 | 50.0 / 90.0 |"  # label, blank, header, rule, then the rows


def test_kd_summary_takes_each_stage_s_best_and_skips_stages_not_reached(tmp_path):
    def write(stage, records):
        (tmp_path / stage).mkdir()
        lines = [{"event": "train", "step": 1, "examples": 32, "loss": 1.0}] + [
            {"event": "validate", "step": s, "examples": 32 * s, **r} for s, r in records]
        (tmp_path / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))

    write("student", [(10, {"val_accuracy": 0.25, "val_token_accuracy": 0.6}),
                      (20, {"val_accuracy": 0.5, "val_token_accuracy": 0.7}),
                      (30, {"val_accuracy": 0.5, "val_token_accuracy": 0.8})])
    write("emulator", [(10, {"val_accuracy": 0.0, "val_r2": 0.75}), (20, {"val_accuracy": 0.0, "val_r2": 0.5})])
    vals = kd_curves.run_validations({"run": tmp_path})
    table = kd_curves.summary(vals["run"])
    assert set(table) == {"student", "emulator"}  # couple and no-CoT not reached
    # The earliest of tied bests; the emulator is ranked by R², not by its constant 0 exact match.
    assert table["student"] == {"validations": 3, "examples": 960, "best_val_accuracy": 0.5,
                                "best_at_examples": 640, "last_token_accuracy": 0.8}
    assert table["emulator"]["best_val_r2"] == 0.75 and table["emulator"]["best_at_examples"] == 320
    kd_curves.plot(vals, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_kd_curves_draw_only_the_panels_some_run_reached(tmp_path, monkeypatch):
    def write(run, stage, record):
        (run / stage).mkdir(parents=True)
        (run / stage / "metrics.jsonl").write_text(json.dumps({"event": "validate", "step": 10, "examples": 320,
                                                               **record}) + "\n")

    student_only, nowhere = tmp_path / "student-only", tmp_path / "nowhere"
    write(student_only, "student", {"val_accuracy": 0.0, "val_token_accuracy": 0.5})
    write(student_only, "emulator", {"val_accuracy": 0.0})  # no R²: no layer's teacher state varied
    nowhere.mkdir()
    vals = kd_curves.run_validations({"a": student_only, "b": nowhere})
    titles = [title for _, title, _ in kd_curves.panels_reached(vals)]
    assert titles == ["student on teacher states (ceiling)"]  # no empty emulator or couple panel
    assert set(kd_curves.summary(vals["a"])) == {"student"}
    figures = []
    monkeypatch.setattr(kd_curves, "save_figure", lambda fig, path: figures.append(fig))
    kd_curves.plot({"a": vals["a"]}, tmp_path / "student.png")
    assert [ax.get_title() for ax in figures[0].axes] == titles
    with pytest.raises(ValueError, match="no stage of run b has a validation"):
        kd_curves.plot({"b": vals["b"]}, tmp_path / "none.png")


def test_kd_ceiling_is_the_pipeline_s_ceiling(kd_config, trained_teacher, student_dir, emulator_dir, monkeypatch,
                                              capsys):
    from icot.data import read_examples
    from icot.kd_quality import kd_stage_quality

    config = dataclasses.replace(kd_config, eval=dataclasses.replace(kd_config.eval, batched_size=7))
    dirs = {"teacher": trained_teacher, "student": student_dir, "emulator": emulator_dir}
    expected = kd_stage_quality(config, dirs, read_examples(config.data.test), progress=False)
    monkeypatch.setattr("sys.argv", ["kd_ceiling", "--teacher", str(trained_teacher), "--student", str(student_dir),
                                     "--test", config.data.test, "--batch-size", "5"])
    kd_ceiling.main()
    got, ceiling = json.loads(capsys.readouterr().out), expected["student_with_teacher_states"]
    assert got["n"] == ceiling["n"] and got["accuracy"] == pytest.approx(ceiling["accuracy"])
    assert got["digit_accuracy"] == pytest.approx(ceiling["digit_accuracy"])


def test_kd_ceiling_scores_the_student_of_the_latest_checkpoint_when_asked(kd_config, trained_teacher, student_dir,
                                                                             tmp_path, monkeypatch, capsys):
    import shutil

    from accelerate import Accelerator

    from icot.config import KDConfig
    from icot.models.student import MindReadingStudent
    from icot.rundir import model_path
    from icot.training.distill import FrozenTeacher
    from icot.training.resume import save_checkpoint
    from icot.training.student import StudentWithTeacher

    def ceiling(student: Path, *flags: str) -> dict:
        monkeypatch.setattr("sys.argv", ["kd_ceiling", "--teacher", str(trained_teacher), "--student", str(student),
                                         "--test", kd_config.data.test, *flags])
        kd_ceiling.main()
        return json.loads(capsys.readouterr().out)

    stage = tmp_path / "student"
    shutil.copytree(student_dir, stage)
    with pytest.raises(SystemExit, match="holds no training checkpoint"):
        ceiling(stage, "--checkpoint")  # a finished stage keeps none
    # A checkpoint as the loop writes it (the student beside the teacher), of a student that moved on from the kept one.
    student, tokenizer = MindReadingStudent.from_pretrained(model_path(stage))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.5 * torch.randn_like(p))
    module = StudentWithTeacher(student, FrozenTeacher(str(model_path(trained_teacher)), KDConfig()))
    optimizer = torch.optim.AdamW(student.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_checkpoint(stage, Accelerator(), module, optimizer, scheduler, {}, torch.zeros(1))
    student.save_pretrained(tmp_path / "moved", tokenizer, meta={"teacher_states": "diagonal"})

    latest, kept = ceiling(stage, "--checkpoint"), ceiling(stage)
    assert latest == ceiling(tmp_path / "moved")  # the checkpoint's student, scored as a model directory
    assert latest["digit_accuracy"] != kept["digit_accuracy"]  # not the kept model

    with pytest.raises(SystemExit, match="is a model directory"):
        ceiling(stage / "best", "--checkpoint")
    with torch.no_grad():
        next(module.teacher.parameters()).add_(1.0)
    save_checkpoint(stage, Accelerator(), module, optimizer, scheduler, {}, torch.zeros(1))
    with pytest.raises(SystemExit, match="trained against another teacher .*differs"):
        ceiling(stage, "--checkpoint")
    shutil.rmtree(stage / "best")  # a stage before its first validation
    with pytest.raises(SystemExit, match="no kept model yet"):
        ceiling(stage, "--checkpoint")
