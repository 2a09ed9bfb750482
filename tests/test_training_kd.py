"""The ICoT-KD stages on the shared loop: student, emulator, couple.

What must hold: the frozen teacher never changes, the trained parts do, and in ``couple`` the answer
loss reaches both the emulator and the student.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from icot.data import parse_line
from icot.models.emulator import ThoughtEmulator
from icot.models.implicit import ImplicitModel
from icot.models.lm import load_lm_dir
from icot.models.student import MindReadingStudent
from icot.models.teacher_states import extract_teacher_states
from icot.rundir import model_path, stage_is_done
from icot.tokenizer import Layout
from icot.training import stages
from icot.training.causal_lm import lm_batch
from icot.training.distill import FrozenTeacher, paired_batch, paired_items


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}  # trained on a GPU or not


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], prefix: str = "") -> set[str]:
    return {k for k in before if k.startswith(prefix) and not torch.equal(before[k], after[k])}


def _valid_loss(stage) -> float:
    """The stage's loss on 16 validation items, wherever training left its module (CPU or GPU)."""
    device = next(stage.module.parameters()).device
    batch = {k: v.to(device) for k, v in stage.collate(stage.valid_items[:16]).items()}
    with torch.no_grad():
        return stage.module(batch)[0].item()


def _teacher_state(teacher_dir) -> dict[str, torch.Tensor]:
    return _state(load_lm_dir(model_path(teacher_dir))[0])


def test_student_trains_mlps_and_lm_but_not_teacher(kd_config, trained_teacher, tmp_path):
    teacher_before = _teacher_state(trained_teacher)
    stage = stages.build("student", kd_config, teacher=str(trained_teacher))
    start = _state(stage.module.student)
    teacher_params = list(stage.module.teacher.parameters())
    assert teacher_params and not any(p.requires_grad for p in teacher_params)
    from icot.training.loop import train_stage

    train_stage(stage, kd_config.student, tmp_path / "student", kd_config, progress=False)
    end = _state(stage.module.student)
    assert _changed(start, end, "mlps."), "the per-layer MLPs must learn"
    assert _changed(start, end, "lm."), "the student LM must learn"
    # Neither the in-memory teacher nor the one on disk moved.
    assert not _changed(teacher_before, _state(stage.module.teacher.lm))
    assert not _changed(teacher_before, _teacher_state(trained_teacher))
    # Started from the teacher's weights (kd.init_from_teacher), so the student LM began equal to it.
    assert all(torch.equal(start[f"lm.{k}"], v) for k, v in teacher_before.items())


def test_student_stage_dir_reloads(student_dir):
    assert stage_is_done(student_dir)
    student, tokenizer = MindReadingStudent.from_pretrained(model_path(student_dir))
    assert student.n_layers == 2 and len(tokenizer) > 10


def test_emulator_trains_its_modules_not_teacher(kd_config, trained_teacher, tmp_path):
    teacher_before = _teacher_state(trained_teacher)
    stage = stages.build("emulator", kd_config, teacher=str(trained_teacher))
    start = _state(stage.module.emulator)
    first_loss = _valid_loss(stage)
    from icot.training.loop import train_stage

    train_stage(stage, dataclasses.replace(kd_config.emulator, max_steps=30, lr=3e-3), tmp_path / "emu",
                kd_config, progress=False)
    end = _state(stage.module.emulator)
    for prefix in ("mlps.", "rnn.", "out_proj.", "lm."):
        assert _changed(start, end, prefix), f"{prefix} must learn"
    assert not _changed(teacher_before, _state(stage.module.teacher.lm))
    assert _valid_loss(stage) < first_loss, "the state loss must fall"


def test_emulator_mixture_components_follow_teacher_tokens(kd_config, trained_teacher):
    config = dataclasses.replace(kd_config, kd=dataclasses.replace(kd_config.kd, mixture_size=3))
    stage = stages.build("emulator", config, teacher=str(trained_teacher))
    batch = stage.collate(stage.train_items[:4])
    loss, parts = stage.module(batch)
    assert set(parts) == {"state_loss", "component_loss"}
    assert torch.isfinite(loss) and parts["component_loss"] > 0


def test_couple_gradients_reach_emulator_and_student(kd_config, student_dir, emulator_dir):
    stage = stages.build("couple", kd_config, student=str(student_dir), emulator=str(emulator_dir))
    implicit: ImplicitModel = stage.module.implicit
    batch = stage.collate(stage.train_items[:8])
    loss, _ = stage.loss(stage.module, batch)
    loss.backward()
    for name, part in (("emulator", implicit.emulator), ("student", implicit.student)):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), f"no gradient reaches the {name}"
    # The emulator's own MLPs get gradient only through the student: the CoT-free answer loss.
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in implicit.emulator.mlps.parameters())


def test_couple_stage_writes_implicit_model(kd_config, student_dir, emulator_dir, tmp_path):
    from icot.evaluation import load_predictor

    out = tmp_path / "implicit"
    result = stages.run("couple", kd_config, out, progress=False, student=str(student_dir),
                        emulator=str(emulator_dir))
    assert result["steps"] == kd_config.couple.max_steps
    predictor = load_predictor(str(out))
    preds = predictor.predict(["1 2 * 3 4", "5 6 * 7 8"])
    assert [p.cot for p in preds] == ["", ""]
    reloaded = ThoughtEmulator.from_pretrained(model_path(out) / "emulator")[0]
    assert reloaded.n_layers == 2


def test_a_nocot_model_is_not_accepted_as_teacher(session_config, trained_nocot):
    from icot.errors import CheckpointError
    from icot.training import stages

    for name in ("student", "emulator"):
        with pytest.raises(CheckpointError, match="not a teacher"):
            stages.build(name, session_config, teacher=str(trained_nocot))
    import dataclasses

    with pytest.raises(CheckpointError, match="not a teacher"):
        stages.build("stepwise", dataclasses.replace(session_config, stepwise=dataclasses.replace(
            session_config.stepwise, epochs=100)), teacher=str(trained_nocot))


def test_state_fit_r2_per_layer():
    """R² is 1 for exact states, 0 for the mean state, None for a layer whose state never varies, and the same
    whether the examples come in one batch or several."""
    from icot.training.emulator import StateFit

    torch.manual_seed(0)
    target = torch.randn(50, 4, 3)  # (B, L, H)
    target[:, 3] = 2.0  # a constant state (as z_0 is the <sep> embedding on some diagonals)
    pred = target.clone()
    pred[:, 1] = target[:, 1].mean(0)  # the mean state: explains nothing
    pred[:, 2] = target[:, 2] + 0.5 * torch.randn(50, 3)
    whole = StateFit(4, 3)
    whole.add(pred, target)
    r2 = whole.r2()
    residual = ((pred[:, 2] - target[:, 2]) ** 2).sum() / ((target[:, 2] - target[:, 2].mean(0)) ** 2).sum()
    assert r2[0] == pytest.approx(1.0) and r2[1] == pytest.approx(0.0, abs=1e-9) and r2[3] is None
    assert r2[2] == pytest.approx(1 - residual.item(), rel=1e-6)
    parts = StateFit(4, 3)
    for i in range(0, 50, 7):
        parts.add(pred[i:i + 7], target[i:i + 7])
    assert parts.r2()[:3] == pytest.approx(r2[:3]) and parts.r2()[3] is None
    with pytest.raises(ValueError):
        whole.add(pred[:, :2], target[:, :2])


def test_emulator_validation_reports_r2_per_layer(kd_config, emulator_dir, trained_teacher):
    """The stage's validation logs the R² that ``icot.kd_quality.emulator_fit`` measures on the same lines."""
    from icot.data import read_examples
    from icot.kd_quality import emulator_fit
    from icot.training.emulator import r2_metrics

    stage = stages.build("emulator", kd_config, teacher=str(trained_teacher))
    stage.module.emulator.load_state_dict(ThoughtEmulator.from_pretrained(model_path(emulator_dir))[0].state_dict())
    stage.module.eval()
    metrics = stage.validate(stage.module)
    fit = emulator_fit(stage.module.emulator, stage.module.teacher, read_examples(kd_config.data.valid), "v", 8)
    assert {k: v for k, v in metrics.items() if k.startswith("r2")} == pytest.approx(r2_metrics(fit))
    assert r2_metrics([0.5, None, 0.25]) == {"r2": 0.375, "r2_layer_0": 0.5, "r2_layer_2": 0.25}
    assert r2_metrics([None, None]) == {}  # no NaN in metrics.jsonl


def test_the_teacher_reads_each_row_up_to_the_last_second_sep_only(kd_config, trained_teacher):
    """Rows with CoTs of different lengths: the paired batch cuts the teacher's rows after the batch's last second
    ``<sep>`` (on the host), and the states read from the cut rows are those of the whole padded rows."""
    teacher = FrozenTeacher(str(trained_teacher), kd_config.kd)
    layout = Layout(teacher.tokenizer)
    examples = [parse_line("1 2 * 3 4||3 6 + 0 4 8 #### 3 0 2 4"),
                parse_line("1 2 * 3 0||3 6 + 0 0 0 #### 3 6 0 0"),
                parse_line("5 * 7||5 3 #### 5 3")]
    items = paired_items(layout, examples, "t")
    batch = paired_batch(items, layout.pad_id)
    whole = lm_batch([it.explicit for it in items], layout.pad_id)  # the uncut explicit rows
    end = int(whole["s2"].max()) + 1
    assert batch["teacher_input_ids"].shape == (3, end) and end < whole["input_ids"].shape[1]
    assert torch.equal(batch["teacher_input_ids"], whole["input_ids"][:, :end])
    assert torch.equal(batch["teacher_s2"], whole["s2"]) and torch.equal(batch["teacher_s1"], whole["s1"])
    z, positions = teacher.states(batch)
    with torch.no_grad():
        full = teacher.lm(input_ids=whole["input_ids"], attention_mask=whole["attention_mask"],
                          output_hidden_states=True)
    torch.testing.assert_close(z, extract_teacher_states(full.hidden_states, whole["s1"], whole["s2"],
                                                         kd_config.kd.subset, kd_config.kd.delta))
    assert int(positions.max()) == end - 1


def test_paired_rows_put_the_second_sep_after_the_first_even_with_an_empty_cot(kd_config, trained_teacher):
    """``teacher_positions`` checks s2 > s1 only on the CPU (a read-back would stall a GPU each step); the paired
    batch must hold it by construction, down to an empty CoT."""
    layout = Layout(FrozenTeacher(str(trained_teacher), kd_config.kd).tokenizer)
    examples = [parse_line("5 * 7|| #### 5 3", allow_empty_cot=True), parse_line("5 * 7||5 3 #### 5 3")]
    batch = paired_batch(paired_items(layout, examples, "t"), layout.pad_id)
    assert torch.equal(batch["teacher_s2"] - batch["teacher_s1"], torch.tensor([1, 3]))
