"""Exact resume: checkpoints every N steps, SIGKILL / SIGTERM / SIGINT mid-stage, atomic saves, bad checkpoints.

Every resumed run is compared with an uninterrupted run of the same config and seed: the final weights
to float tolerance and every logged metric. Dropout is on, so the restored RNG states matter too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from icot.cli import main
from icot.config import load_config, output_settings, save_config
from icot.errors import CheckpointError, TrainingInterrupted
from icot.models.lm import load_lm_dir
from icot.pipeline import run_stages
from icot.rundir import CHECKPOINT, STATE_FILE, can_resume, read_meta, recover_atomically, stage_is_done
from icot.training import resume as resume_module
from icot.training import stages
from icot.training.causal_lm import CausalLMStage
from icot.training.loop import lr_factor, setting_changes, train_stage
from interrupts import signal_at_call

TOLERANCE = 1e-5


def _config(tiny_config, **teacher):
    section = {"max_steps": 30, "eval_every": 10, "log_every": 1, "save_every": 3, "epochs": 100.0, **teacher}
    return dataclasses.replace(tiny_config, model=dataclasses.replace(tiny_config.model, dropout=0.1),
                               teacher=dataclasses.replace(tiny_config.teacher, **section))


def _records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines]


def _assert_same_records(got: list[dict], want: list[dict]) -> None:
    assert [(r["event"], r["step"]) for r in got] == [(r["event"], r["step"]) for r in want]
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for k in a:
            expected = pytest.approx(b[k], rel=TOLERANCE, abs=TOLERANCE) if isinstance(b[k], float) else b[k]
            assert a[k] == expected, (a["event"], a["step"], k)


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((x.float() - b[k].float()).abs().max().item() for k, x in a.items())


def _best_weights(out: Path) -> dict[str, torch.Tensor]:
    model, _, _ = load_lm_dir(out / "best")
    return model.state_dict()


def _checkpoint_step(out: Path) -> int | None:
    try:
        return json.loads((out / CHECKPOINT / STATE_FILE).read_text(encoding="utf-8"))["position"]["step"]
    except (OSError, ValueError, KeyError):
        return None  # not there yet, or between the two renames of an atomic save


def _train(config, out, resume=False, interrupt_at=0, stage_class=None):
    stage = stage_class(config) if stage_class else stages.build("teacher", config)
    if interrupt_at:
        signal_at_call(stage, interrupt_at)
    result = train_stage(stage, config.teacher, out, config, progress=False, resume=resume)
    return stage, result


@pytest.fixture(scope="module")
def reference(session_config, tmp_path_factory):
    """An uninterrupted run (read only): ``(config, out_dir, final weights, result)``."""
    config, out = _config(session_config), tmp_path_factory.mktemp("reference")
    stage, result = _train(config, out)
    return config, out, {k: v.clone() for k, v in stage.module.state_dict().items()}, result


# ---------------------------------------------------------------------------------------------
# In process: SIGINT, resume, curriculum replay, atomic saves


def test_sigint_saves_a_checkpoint_and_resume_equals_an_uninterrupted_run(reference, tmp_path):
    config, ref_out, ref_weights, ref_result = reference
    out = tmp_path / "run"
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as info:
        _train(config, out, interrupt_at=26)  # mid second epoch (20 steps per epoch), after the validation at 20
    assert signal.getsignal(signal.SIGINT) is previous  # handlers restored
    assert (info.value.signum, info.value.exit_code, info.value.step) == (signal.SIGINT, 130, 26)
    assert _checkpoint_step(out) == 26 and can_resume(out) and not stage_is_done(out)

    stage, result = _train(config, out, resume=True)
    assert _max_difference(stage.module.state_dict(), ref_weights) <= TOLERANCE
    assert result["steps"] == ref_result["steps"] and result["best"] == pytest.approx(ref_result["best"])
    _assert_same_records(_records(out), _records(ref_out))
    assert _max_difference(_best_weights(out), _best_weights(ref_out)) <= TOLERANCE
    assert stage_is_done(out) and not (out / CHECKPOINT).exists()


class CurriculumStage(CausalLMStage):
    """A teacher whose optimizer is reset every 4 steps, tracking its phase the way the stepwise stage does."""

    def __init__(self, config):
        super().__init__("teacher", config, config.teacher, with_cot=True)
        self.phase = 0

    def begin_step(self, step: int) -> bool:
        phase, changed = step // 4, step // 4 != self.phase
        self.phase = phase
        return changed


def test_resume_replays_the_curriculum_and_its_optimizer_resets(session_config, tmp_path):
    config = _config(session_config, max_steps=16, eval_every=8, grad_accum=2)
    torch.manual_seed(0)
    ref_stage, _ = _train(config, tmp_path / "reference", stage_class=CurriculumStage)
    torch.manual_seed(0)
    with pytest.raises(TrainingInterrupted):
        _train(config, tmp_path / "run", interrupt_at=2 * 10 - 1, stage_class=CurriculumStage)  # 2 micro-batches a step
    assert _checkpoint_step(tmp_path / "run") == 10
    torch.manual_seed(0)
    stage, _ = _train(config, tmp_path / "run", resume=True, stage_class=CurriculumStage)
    assert _max_difference(stage.module.state_dict(), ref_stage.module.state_dict()) <= TOLERANCE
    resets = [r["step"] for r in _records(tmp_path / "run") if r["event"] == "optimizer_reset"]
    assert resets == [r["step"] for r in _records(tmp_path / "reference") if r["event"] == "optimizer_reset"]
    assert resets == [4, 8, 12]


def test_failed_save_keeps_the_previous_checkpoint(reference, tmp_path, monkeypatch):
    config, ref_out, ref_weights, _ = reference
    out = tmp_path / "run"
    real_save_file, saves = resume_module.save_file, []

    def failing_on_the_fifth(tensors, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 5:  # the second checkpoint's optimizer file (model, optimizer, rng per checkpoint)
            raise OSError("No space left on device")
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(resume_module, "save_file", failing_on_the_fifth)
    with pytest.raises(OSError, match="No space"):
        _train(config, out)
    monkeypatch.undo()
    assert _checkpoint_step(out) == 3  # the first checkpoint, untouched
    assert not list(out.glob(f".{CHECKPOINT}.*"))  # no temporary directory left behind
    stage, _ = _train(config, out, resume=True)
    assert _max_difference(stage.module.state_dict(), ref_weights) <= TOLERANCE


def test_kill_between_the_renames_of_a_save_recovers_the_previous_checkpoint(reference, tmp_path):
    config, _, ref_weights, _ = reference
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        _train(config, out, interrupt_at=7)
    os.replace(out / CHECKPOINT, out / f".{CHECKPOINT}.old-12345")  # as if killed inside save_atomically
    assert can_resume(out)
    stage, _ = _train(config, out, resume=True)
    assert _max_difference(stage.module.state_dict(), ref_weights) <= TOLERANCE
    assert not list(out.glob(f".{CHECKPOINT}*")) and not (out / CHECKPOINT).exists()


def test_pipeline_resumes_an_interrupted_stage(reference, tmp_path, capsys):
    config, ref_out, _, _ = reference
    config = dataclasses.replace(config, methods=["explicit"])
    run_dir = tmp_path / "pipe"
    with pytest.raises(TrainingInterrupted):
        _train(config, run_dir / "teacher", interrupt_at=5)
    run_stages(config, run_dir, progress=False)
    assert "stage teacher -> " in capsys.readouterr().out.split("(resuming from its checkpoint)")[0]
    _assert_same_records(_records(run_dir / "teacher"), _records(ref_out))


# ---------------------------------------------------------------------------------------------
# Through the command line: a real process, SIGKILL and SIGTERM


def _start(config_file: Path, out: Path, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "icot.cli", "train", "teacher", "--config", str(config_file),
                             "--out", str(out), *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (status {proc.returncode}) before it could be interrupted: "
                                 f"{proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.005)


@pytest.fixture(scope="module")
def long_run(session_config, tmp_path_factory):
    """A config long enough to interrupt (80 steps), its YAML file and an uninterrupted run of it (read only)."""
    config, directory = _config(session_config, max_steps=80, save_every=4), tmp_path_factory.mktemp("long")
    save_config(config, directory / "long.yaml")
    assert main(["train", "teacher", "--config", str(directory / "long.yaml"), "--out", str(directory / "ref")]) == 0
    return directory / "long.yaml", directory / "ref"


@pytest.mark.slow
def test_sigkill_mid_stage_then_resume_equals_an_uninterrupted_run(long_run, tmp_path, capsys):
    config_file, ref_out = long_run
    out = tmp_path / "killed"
    proc = _start(config_file, out)
    _wait_for(lambda: (_checkpoint_step(out) or 0) >= 24, proc)  # in the second epoch (20 steps each)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    killed_at = _checkpoint_step(out)
    assert killed_at is not None and killed_at < 80 and not stage_is_done(out)

    capsys.readouterr()
    assert main(["train", "teacher", "--config", str(config_file), "--out", str(out), "--resume"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 80 and result["best"] == pytest.approx(read_meta(ref_out)["best"])
    _assert_same_records(_records(out), _records(ref_out))
    difference = _max_difference(_best_weights(out), _best_weights(ref_out))
    print(f"killed at checkpoint step {killed_at}; max |weight difference| after resume: {difference:.3g}")
    assert difference <= TOLERANCE


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_143(long_run, tmp_path):
    config_file, ref_out = long_run
    out = tmp_path / "terminated"
    proc = _start(config_file, out, "--teacher.save_every", "0")  # the signal's checkpoint is the only one
    metrics = out / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and metrics.read_bytes().count(b"\n") >= 5, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    lines = [x for x in err.splitlines() if x.startswith("icot:")]
    assert len(lines) == 1 and "interrupted by SIGTERM at step" in lines[0] and "--resume" in lines[0]
    assert "Traceback" not in err
    step = _checkpoint_step(out)
    assert step is not None and f"step {step};" in lines[0] and not stage_is_done(out)

    assert main(["train", "teacher", "--config", str(config_file), "--out", str(out), "--resume",
                 "--teacher.save_every", "0"]) == 0
    _assert_same_records(_records(out), _records(ref_out))
    assert _max_difference(_best_weights(out), _best_weights(ref_out)) <= TOLERANCE


# ---------------------------------------------------------------------------------------------
# Checkpoints that do not fit


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("icot: error: "), lines
    return lines[0]


def test_a_signal_during_the_last_step_finishes_the_stage_then_stops(reference, tmp_path):
    """It used to be dropped: the stage ended as done and a pipeline went on as if nothing had been asked."""
    config, ref_out, _, _ = reference
    out = tmp_path / "run"
    stage = stages.build("teacher", config)
    signal_at_call(stage, config.teacher.max_steps, signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as info:
        train_stage(stage, config.teacher, out, config, progress=False)
    assert info.value.exit_code == 128 + signal.SIGTERM and info.value.step == config.teacher.max_steps
    assert "as the stage finished" in str(info.value) and str(out) in str(info.value)
    assert stage_is_done(out) and not can_resume(out)  # complete: a rerun pipeline skips it
    assert _max_difference(_best_weights(out), _best_weights(ref_out)) < 1e-6


def test_resume_without_a_checkpoint_is_one_line_error(reference, tmp_path, capsys):
    config_file = tmp_path / "c.yaml"
    save_config(reference[0], config_file)
    assert main(["train", "teacher", "--config", str(config_file), "--out", str(tmp_path / "t"), "--resume"]) == 2
    assert f"{tmp_path / 't' / CHECKPOINT}: no checkpoint" in _one_error_line(capsys)


def _interrupt_then_resume(reference, tmp_path, capsys, *overrides: str, damage=None) -> tuple[Path, str]:
    """Interrupt a run at step 4, optionally ``damage(out)`` its checkpoint, resume through the CLI with
    ``overrides``; the resume must fail with exit 2 and one error line, returned with the run directory."""
    config, _, _, _ = reference
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        _train(config, out, interrupt_at=4)
    if damage is not None:
        damage(out)
    config_file = tmp_path / "c.yaml"
    save_config(config, config_file)
    capsys.readouterr()
    argv = ["train", "teacher", "--config", str(config_file), "--out", str(out), "--resume", *overrides]
    assert main(argv) == 2
    return out, _one_error_line(capsys)


def test_resume_with_another_batch_size_is_one_line_error(reference, tmp_path, capsys):
    out, line = _interrupt_then_resume(reference, tmp_path, capsys, "--teacher.batch_size", "8")
    assert str(out / CHECKPOINT / STATE_FILE) in line and "'batch_size'" in line


def _interrupted(config, out: Path, at: int) -> Path:
    """``out`` after a run of ``config`` stopped by SIGINT at optimizer step ``at`` (a checkpoint is there)."""
    with pytest.raises(TrainingInterrupted):
        _train(config, out, interrupt_at=at)
    return out


def test_resume_with_another_model_shape_is_refused_naming_the_field(reference, tmp_path, capsys):
    out, line = _interrupt_then_resume(reference, tmp_path, capsys, "--model.n_embd", "16")
    assert str(out / CHECKPOINT / STATE_FILE) in line and "'model.n_embd'" in line


def test_checkpoint_weights_of_another_shape_are_one_line_error(reference, tmp_path):
    config, _, _, _ = reference
    out = _interrupted(config, tmp_path / "run", at=4)
    narrow = dataclasses.replace(config, model=dataclasses.replace(config.model, n_embd=16))
    with pytest.raises(CheckpointError, match="does not fit this stage's model: .*transformer.") as info:
        resume_module.load_module_state(out / CHECKPOINT, stages.build("teacher", narrow).module)
    assert str(out / CHECKPOINT / "model.safetensors") in str(info.value)


def test_resume_with_a_changed_learning_rate_is_refused_naming_the_field(reference, tmp_path, capsys):
    """The old behaviour kept training at the checkpoint's rate while config.yaml said the new one."""
    out, line = _interrupt_then_resume(reference, tmp_path, capsys, "--teacher.lr", "5e-4")
    assert "field 'teacher.lr' was 0.003 when this checkpoint was written and is 0.0005 now" in line
    assert "lr: 0.0005" not in (out / "config.yaml").read_text()  # config.yaml still states what ran


def test_resume_on_other_data_of_the_same_length_is_refused(reference, tmp_path, capsys):
    config, _, _, _ = reference
    train = tmp_path / "train.txt"
    train.write_text(Path(config.data.train).read_text(encoding="utf-8"), encoding="utf-8")
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, train=str(train)))
    out = _interrupted(config, tmp_path / "run", at=4)
    lines = train.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[0], lines[1] = lines[1], lines[0]  # same lines, same count, other data order
    train.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(CheckpointError, match="training data differ"):
        _train(config, out, resume=True)


def test_resume_with_a_longer_budget_applies_it_and_logs_the_change(reference, tmp_path):
    config, ref_out, _, _ = reference
    out = _interrupted(config, tmp_path / "run", at=5)
    longer = dataclasses.replace(config, teacher=dataclasses.replace(config.teacher, max_steps=36))
    _, result = _train(longer, out, resume=True)
    assert result["steps"] == 36
    records = _records(out)
    changes = [r for r in records if r["event"] == "resume"]
    assert changes == [{"event": "resume", "step": 5, "changed": {"teacher.max_steps": [30, 36]}}]
    assert "max_steps: 36" in (out / "config.yaml").read_text()
    # Up to the resume the record is the uninterrupted run's.
    before = [r for r in records if r["step"] <= 5 and r["event"] != "resume"]
    _assert_same_records(before, [r for r in _records(ref_out) if r["step"] <= 5])


def test_resume_in_another_mixed_precision_applies_it_and_logs_the_change(reference, tmp_path):
    """A run moved to a machine where ``auto`` resolves otherwise (or resumed with another precision) continues
    in the new precision, and the record says so."""
    config, _, _, _ = reference
    out = _interrupted(config, tmp_path / "run", at=5)
    bf16 = dataclasses.replace(config, teacher=dataclasses.replace(config.teacher, mixed_precision="bf16"))
    _, result = _train(bf16, out, resume=True)
    assert result["steps"] == config.teacher.max_steps and result["mixed_precision"] == "bf16"
    changes = [r for r in _records(out) if r["event"] == "resume"]
    assert changes == [{"event": "resume", "step": 5, "changed": {"teacher.mixed_precision": ["no", "bf16"]}}]


def test_resume_with_a_compiled_forward_gives_the_eager_runs_losses(reference, tmp_path):
    """Compilation may be switched on when a run resumes (the same computation, faster): the record logs the
    change, and the losses after the resume follow the uninterrupted eager run's on the same batches (within 2%:
    compiled kernels round, and draw dropout masks, differently)."""
    config, ref_out, _, _ = reference
    out = _interrupted(config, tmp_path / "run", at=5)
    compiled = dataclasses.replace(config, teacher=dataclasses.replace(config.teacher, compile=True))
    _, result = _train(compiled, out, resume=True)
    assert result["steps"] == config.teacher.max_steps and result["compile"] is True
    records = _records(out)
    changes = [r for r in records if r["event"] == "resume"]
    assert changes == [{"event": "resume", "step": 5, "changed": {"teacher.compile": [False, True]}}]
    losses = [r["loss"] for r in records if r["event"] == "train"]
    assert losses == pytest.approx([r["loss"] for r in _records(ref_out) if r["event"] == "train"], rel=0.02)


def test_resume_can_anneal_a_constant_rate_from_the_resumed_step(reference, tmp_path):
    """A plateaued constant-rate run resumed under a cosine decay: the rate after the resume is the new
    schedule's at each step, the peak stays the checkpoint's, and the change is in the record."""
    config, _, _, _ = reference
    out = _interrupted(config, tmp_path / "run", at=5)
    annealed = dataclasses.replace(config, teacher=dataclasses.replace(config.teacher, lr_schedule="cosine",
                                                                       min_lr_ratio=0.1))
    _, result = _train(annealed, out, resume=True)
    assert result["steps"] == config.teacher.max_steps
    records = _records(out)
    changes = [r for r in records if r["event"] == "resume"]
    assert changes == [{"event": "resume", "step": 5, "changed": {"teacher.lr_schedule": ["constant", "cosine"],
                                                                  "teacher.min_lr_ratio": [0.0, 0.1]}}]
    rates = {r["step"]: r["lr"] for r in records if r["event"] == "train"}
    assert all(rates[step] == pytest.approx(config.teacher.lr) for step in range(1, 6))  # before: constant
    for step in range(6, config.teacher.max_steps + 1):  # after: the scheduler has stepped `step` times
        want = config.teacher.lr * lr_factor(step, annealed.teacher, config.teacher.max_steps)
        assert rates[step] == pytest.approx(want)
    assert rates[config.teacher.max_steps] == pytest.approx(0.1 * config.teacher.lr)


def test_corrupt_trainer_state_is_one_line_error(reference, tmp_path, capsys):
    def corrupt(out: Path) -> None:
        (out / CHECKPOINT / STATE_FILE).write_bytes(b"\xff{not json")

    out, line = _interrupt_then_resume(reference, tmp_path, capsys, damage=corrupt)
    assert str(out / CHECKPOINT / STATE_FILE) in line


def test_each_process_gets_its_own_rng_row(reference, tmp_path):
    """Process r restores row r of every RNG state (row 1 once crashed: a view with a storage offset)."""
    config, _, _, _ = reference
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        _train(config, out, interrupt_at=4)
    path = out / CHECKPOINT
    rng = load_file(str(path / resume_module.RNG_FILE))
    other = torch.Generator().manual_seed(1234).get_state()
    rng["torch"] = torch.stack([rng["torch"][0], other])  # as if written by two processes
    rng = {k: v if k in ("torch", "data_epoch_start") else torch.cat([v, v]) for k, v in rng.items()}
    save_file(rng, str(path / resume_module.RNG_FILE))
    stage = stages.build("teacher", config)
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    optimizer = torch.optim.AdamW([p for p in stage.module.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    second_process = SimpleNamespace(process_index=1, scaler=None)
    saved = torch.get_rng_state()
    try:
        resume_module.load_training_state(path, state, second_process, optimizer, scheduler)
        assert torch.equal(torch.get_rng_state(), other)
    finally:
        torch.set_rng_state(saved)


def test_recover_atomically_puts_back_what_an_interrupted_save_moved_aside(tmp_path):
    best = tmp_path / "best"
    (tmp_path / ".best.old-1").mkdir()
    (tmp_path / ".best.old-1" / "weights").write_text("previous", encoding="utf-8")
    (tmp_path / ".best.tmp-abc").mkdir()  # a half-written new one
    recover_atomically(best)
    assert (best / "weights").read_text(encoding="utf-8") == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    (tmp_path / ".best.old-2").mkdir()  # killed after the new one was in place: only the old copy goes
    recover_atomically(best)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"] and (best / "weights").is_file()


def _packed_like_cudnn(lstm: torch.nn.LSTM) -> torch.nn.LSTM:
    """Make ``lstm``'s weights views into one flat buffer, as cuDNN's ``flatten_parameters`` does on a GPU."""
    flat = torch.cat([p.detach().reshape(-1) for p in lstm.parameters()])
    offset = 0
    for p in lstm.parameters():
        p.data = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    return lstm


class _TiedAndPacked(torch.nn.Module):
    """A tied embedding / head pair and a packed LSTM: the two storage layouts a checkpoint meets."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 4)
        self.head = torch.nn.Linear(4, 5, bias=False)
        self.head.weight = self.embed.weight
        self.rnn = _packed_like_cudnn(torch.nn.LSTM(4, 4))


def test_checkpoint_model_file_stores_tied_weights_once_and_packed_views_whole(tmp_path):
    torch.manual_seed(0)
    saved = _TiedAndPacked()
    first = saved.rnn.weight_ih_l0
    assert first.untyped_storage().nbytes() > first.numel() * first.element_size()  # a view of a larger buffer
    save_file(resume_module._state_tensors(saved.state_dict()), str(tmp_path / resume_module.MODEL_FILE))
    stored = load_file(str(tmp_path / resume_module.MODEL_FILE))
    assert ("embed.weight" in stored) != ("head.weight" in stored)  # one name for the tied pair
    assert {k for k in stored if k.startswith("rnn.")} == {k for k in saved.state_dict() if k.startswith("rnn.")}

    torch.manual_seed(1)
    loaded = _TiedAndPacked()
    resume_module.load_module_state(tmp_path, loaded)
    for name, value in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert loaded.head.weight is loaded.embed.weight  # still tied
    # Loading wrote into the packed buffer in place: the LSTM still runs on its views.
    assert loaded.rnn.weight_ih_l0.untyped_storage().data_ptr() == loaded.rnn.weight_hh_l0.untyped_storage().data_ptr()


def test_resume_below_the_checkpoint_step_is_refused(reference, tmp_path):
    config, _, _, _ = reference
    out = _interrupted(config, tmp_path / "run", at=8)
    shorter = dataclasses.replace(config, teacher=dataclasses.replace(config.teacher, max_steps=5))
    with pytest.raises(CheckpointError, match="max_steps' is 5, but this checkpoint is at step 8"):
        _train(shorter, out, resume=True)


def test_neutral_fields_may_change_anywhere_and_new_fields_are_not_compared():
    saved = {"teacher.lr": 0.001, "teacher.max_steps": 30, "reads.teacher": "/a"}
    assert setting_changes(saved, {**saved, "teacher.max_steps": 60}, "teacher") == (
        {"teacher.max_steps": [30, 60]}, None)
    assert setting_changes(saved, {**saved, "teacher.new_field": 1}, "teacher") == ({}, None)
    _, refused = setting_changes(saved, {**saved, "teacher.max_steps": 60}, "student")  # another stage's budget
    assert "field 'teacher.max_steps' was 30" in refused
    _, refused = setting_changes(saved, {**saved, "reads.teacher": "/b"}, "student")  # another teacher
    assert "field 'reads.teacher' was '/a'" in refused
    config = _config(load_config())
    neutral = dataclasses.replace(config, teacher=dataclasses.replace(config.teacher, save_every=7, log_every=9,
                                                                       log_with="tensorboard"),
                                  data=dataclasses.replace(config.data, test="other.txt"))
    assert output_settings(neutral, ["data", "teacher"]) == output_settings(config, ["data", "teacher"])


def _pipeline_interrupted_at(config, run_dir: Path, at: int, monkeypatch) -> None:
    """Run the pipeline until SIGINT at the ``at``-th loss call of the stage it trains."""
    build = stages.build

    def interrupting(name, run_config, **dirs):
        stage = build(name, run_config, **dirs)
        signal_at_call(stage, at)
        return stage

    monkeypatch.setattr(stages, "build", interrupting)
    try:
        with pytest.raises(TrainingInterrupted):
            run_stages(config, run_dir, progress=False)
    finally:
        monkeypatch.setattr(stages, "build", build)


def test_pipeline_resumes_across_neutral_changes_and_retrains_on_others(reference, tmp_path, capsys, monkeypatch):
    config, _, _, _ = reference
    config = dataclasses.replace(config, methods=["explicit"])
    run_dir = tmp_path / "pipe"
    with pytest.raises(TrainingInterrupted):
        _train(config, run_dir / "teacher", interrupt_at=5)
    other_lr = dataclasses.replace(config, teacher=dataclasses.replace(config.teacher, lr=1e-3))
    _pipeline_interrupted_at(other_lr, run_dir, 4, monkeypatch)  # interrupted again: a checkpoint for the next case
    out = capsys.readouterr().out
    assert "not resuming its checkpoint (field 'teacher.lr' was 0.003" in out and "training afresh" in out
    assert _checkpoint_step(run_dir / "teacher") == 4  # started afresh, not at 5 + 4
    louder = dataclasses.replace(other_lr, teacher=dataclasses.replace(other_lr.teacher, log_every=2))
    run_stages(louder, run_dir, progress=False)
    assert "(resuming from its checkpoint)" in capsys.readouterr().out
    assert read_meta(run_dir / "teacher")["steps"] == config.teacher.max_steps


@pytest.mark.slow
def test_a_compiled_run_checkpoints_plain_names_and_resumes(reference, tmp_path):
    """``compile: true``: the checkpoint names tensors as the model does (not torch.compile's
    ``_orig_mod.X``), so that ``--resume`` loads it; the resumed run ends as an uninterrupted compiled one."""
    config = reference[0]
    config = dataclasses.replace(config, teacher=dataclasses.replace(config.teacher, compile=True, max_steps=8,
                                                                     eval_every=0))
    whole, _ = _train(config, tmp_path / "whole")
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        _train(config, out, interrupt_at=5)
    names = set(load_file(str(out / CHECKPOINT / "model.safetensors")))
    assert names and not any(n.startswith("_orig_mod.") for n in names)
    stage, _ = _train(config, out, resume=True)
    assert _max_difference(stage.module.state_dict(), whole.module.state_dict()) <= 1e-4


def test_a_checkpoint_with_compiled_names_still_loads(reference, tmp_path):
    """Checkpoints written by compiled runs before the fix name every tensor ``_orig_mod.X``."""
    config, _, ref_weights, _ = reference
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        _train(config, out, interrupt_at=7)
    file = out / CHECKPOINT / "model.safetensors"
    save_file({f"_orig_mod.{k}": v for k, v in load_file(str(file)).items()}, str(file))
    stage, _ = _train(config, out, resume=True)
    assert _max_difference(stage.module.state_dict(), ref_weights) <= TOLERANCE
