"""ICoT-KD stage by stage: the student's ceiling on the teacher's states, the emulator's R², the uncoupled pair."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from icot.data import Example, read_examples
from icot.errors import DataFormatError
from icot.evaluation import ImplicitPredictor, answers_match, evaluate
from icot.kd_quality import TeacherStatesPredictor, emulator_fit, kd_stage_quality, reference_lines
from icot.models.emulator import ThoughtEmulator
from icot.models.implicit import ImplicitModel
from icot.models.student import MindReadingStudent
from icot.rundir import model_path
from icot.tokenizer import Layout
from icot.training.distill import FrozenTeacher, paired_batch, paired_items
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


def test_the_ceiling_answers_as_the_student_stage_validates(kd_config, models):
    """Two paths to the same answers: the predictor (over ``evaluate``'s batches, in any order) and the student
    stage's own decoding of the same lines with the same budget."""
    teacher, student, _ = models
    valid = read_examples(kd_config.data.valid)
    predictor = TeacherStatesPredictor(student, teacher, valid, kd_config.data.valid, max_new_tokens=16)
    items = paired_items(predictor.layout, valid, kd_config.data.valid)
    direct = StudentWithTeacher(student, teacher).answers(paired_batch(items, predictor.layout.pad_id),
                                                          predictor.layout, 16)
    shuffled = [p.answer for p in predictor.predict([ex.input for ex in reversed(valid)])][::-1]
    assert shuffled == direct
    result = evaluate(predictor, valid, batch_size=7, progress=False, warmup=False)
    assert result["correct"] == sum(answers_match(a, ex.answer) for a, ex in zip(direct, valid))
    assert len(result["digit_accuracy"]) == len(valid[0].answer.split())


def test_the_ceiling_reads_the_states_of_each_input_s_own_cot(kd_config, models, monkeypatch):
    """Whatever the batch holds beside it, each input is decoded with the teacher's states of its own reference
    line (compared state by state, so an untrained student's uniform answers cannot hide a mix-up)."""
    teacher, student, _ = models
    valid = read_examples(kd_config.data.valid)[:6]
    predictor = TeacherStatesPredictor(student, teacher, valid, kd_config.data.valid, max_new_tokens=8)
    seen = []
    generate = student.generate
    monkeypatch.setattr(student, "generate", lambda ids, mask, s1, z, *rest: seen.append(z) or generate(ids, mask, s1, z, *rest))
    order = [3, 0, 5, 1, 4, 2]
    predictor.predict([valid[i].input for i in order])
    layout = predictor.layout
    for row, i in enumerate(order):
        own = teacher.states(paired_batch(paired_items(layout, [valid[i]], "v"), layout.pad_id))[0][0]  # (L, H)
        torch.testing.assert_close(seen[0][row], own, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(seen[0][0], seen[0][1])  # different lines, different states
    with pytest.raises(KeyError, match="not among the reference lines"):
        predictor.predict(["9 9 * 9 9"])


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


def test_emulator_fit_makes_no_call_across_processes(kd_config, models, monkeypatch):
    """Only the main process evaluates: a collective call there would wait for ever under accelerate launch."""
    teacher, _, emulator = models

    def collective(*args):
        raise AssertionError("emulator_fit summed across processes")

    monkeypatch.setattr("icot.training.emulator.sum_tensor_across", collective)
    assert len(emulator_fit(emulator, teacher, read_examples(kd_config.data.valid), "v", batch_size=8)) == 2


def test_kd_stage_quality_measures_each_stage(kd_config, trained_teacher, student_dir, emulator_dir, models):
    teacher, student, emulator = models
    config = dataclasses.replace(kd_config, eval=dataclasses.replace(kd_config.eval, limit=12, batched_size=5))
    dirs = {"teacher": trained_teacher, "student": student_dir, "emulator": emulator_dir}
    test = read_examples(config.data.test)
    kd = kd_stage_quality(config, dirs, test, progress=False)
    assert kd["student_with_teacher_states"]["n"] == 12 == kd["emulator_then_student"]["n"]
    ceiling = evaluate(TeacherStatesPredictor(student, teacher, test, "t", config.eval.max_new_tokens), test[:12],
                       batch_size=3, progress=False, warmup=False)
    assert kd["student_with_teacher_states"]["digit_accuracy"] == pytest.approx(ceiling["digit_accuracy"])
    assert kd["emulator_r2"] == pytest.approx(emulator_fit(emulator, teacher, test[:12], "t", batch_size=4))
    pair = ImplicitModel(emulator, student)
    pair.tokenizer = teacher.tokenizer
    uncoupled = evaluate(ImplicitPredictor(pair, config.eval.max_new_tokens), test[:12], batch_size=1,
                         progress=False, warmup=False)
    assert kd["emulator_then_student"]["digit_accuracy"] == pytest.approx(uncoupled["digit_accuracy"])
