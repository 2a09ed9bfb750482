"""ICoT-KD stage by stage: the student's ceiling on the teacher's states, the emulator's R², the uncoupled pair."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from icot.data import Example, read_examples
from icot.errors import DataFormatError
from icot.evaluation import ImplicitPredictor, evaluate
from icot.kd_quality import TeacherStatesPredictor, emulator_fit, kd_stage_quality, reference_lines
from icot.models.emulator import ThoughtEmulator
from icot.models.implicit import ImplicitModel
from icot.models.student import MindReadingStudent
from icot.rundir import model_path
from icot.tokenizer import Layout
from icot.training.distill import FrozenTeacher, paired_batch, paired_items, validate_paired
from icot.training.emulator import StateFit
from icot.training.student import StudentWithTeacher


@pytest.fixture(scope="module")
def models(kd_config, trained_teacher, student_dir, emulator_dir):
    teacher = FrozenTeacher(str(trained_teacher), kd_config.kd)
    student = MindReadingStudent.from_pretrained(model_path(student_dir))[0].eval()
    emulator = ThoughtEmulator.from_pretrained(model_path(emulator_dir))[0].eval()
    return teacher, student, emulator


def test_reference_lines_refuse_a_missing_or_ambiguous_cot():
    a, b = Example("1 2 * 3 4", "3 6 0", "3 6 0 0"), Example("1 2 * 3 4", "3 6 1", "3 6 0 0")
    assert reference_lines([a, a], "t.txt") == {a.input: a}  # the same line twice is no ambiguity
    with pytest.raises(DataFormatError, match=r"t.txt:2.*another CoT"):
        reference_lines([a, b], "t.txt")
    with pytest.raises(DataFormatError, match=r"t.txt:1.*no CoT"):
        reference_lines([Example("1 2 * 3 4", "", "3 6 0 0")], "t.txt")


def test_the_ceiling_is_the_student_stage_s_own_exact_match(kd_config, models):
    """Two paths to the same number: the predictor over ``evaluate`` and the student stage's validation."""
    teacher, student, _ = models
    valid = read_examples(kd_config.data.valid)
    predictor = TeacherStatesPredictor(student, teacher, valid, kd_config.data.valid, max_new_tokens=32)
    result = evaluate(predictor, valid, batch_size=7, progress=False, warmup=False)
    items = paired_items(predictor.layout, valid, kd_config.data.valid)
    stage_view = validate_paired(StudentWithTeacher(student, teacher), predictor.layout, items, 7, len(items))
    assert result["accuracy"] == pytest.approx(stage_view["accuracy"])
    assert len(result["digit_accuracy"]) == len(valid[0].answer.split())


def test_the_ceiling_reads_the_states_of_each_input_s_own_cot(kd_config, models):
    """The predictor looks up each input's reference CoT: its answers equal the student's given those states,
    whatever the batch holds beside it."""
    teacher, student, _ = models
    valid = read_examples(kd_config.data.valid)[:6]
    predictor = TeacherStatesPredictor(student, teacher, valid, kd_config.data.valid, max_new_tokens=32)
    together = [p.answer for p in predictor.predict([ex.input for ex in reversed(valid)])][::-1]
    alone = [predictor.predict([ex.input])[0].answer for ex in valid]
    assert together == alone
    batch = paired_batch(paired_items(predictor.layout, valid[:1], "v"), predictor.layout.pad_id)
    direct = StudentWithTeacher(student, teacher).answers(batch, predictor.layout, 32)
    assert alone[0] == direct[0]


def test_emulator_fit_is_r2_over_all_lines_in_any_batches(kd_config, models):
    teacher, _, emulator = models
    valid = read_examples(kd_config.data.valid)
    layout = Layout(teacher.tokenizer)
    batch = paired_batch(paired_items(layout, valid, "v"), layout.pad_id)
    with torch.no_grad():
        z = teacher.states(batch)[0]
        pred = emulator(batch["input_ids"], batch["attention_mask"], batch["s1"]).states
    one = StateFit(emulator.n_layers, emulator.hidden_size)
    one.add(pred, z)
    assert emulator_fit(emulator, teacher, valid, "v", batch_size=6) == pytest.approx(one.r2())


def test_kd_stage_quality_measures_each_stage(kd_config, trained_teacher, student_dir, emulator_dir, models):
    teacher, student, emulator = models
    config = dataclasses.replace(kd_config, eval=dataclasses.replace(kd_config.eval, limit=12, batched_size=5))
    dirs = {"teacher": trained_teacher, "student": student_dir, "emulator": emulator_dir}
    test = read_examples(config.data.test)
    kd = kd_stage_quality(config, dirs, test, progress=False)
    assert kd["student_with_teacher_states"]["n"] == 12 == kd["emulator_then_student"]["n"]
    assert len(kd["emulator_r2"]) == emulator.n_layers
    pair = ImplicitModel(emulator, student)
    pair.tokenizer = teacher.tokenizer
    uncoupled = evaluate(ImplicitPredictor(pair, config.eval.max_new_tokens), test[:12], batch_size=1,
                         progress=False, warmup=False)
    assert kd["emulator_then_student"]["digit_accuracy"] == pytest.approx(uncoupled["digit_accuracy"])
