"""FSDP2: two CPU processes (gloo) shard a teacher's weights, gradients and optimizer state.

Accelerate does not select FSDP on CPU processes by itself; ``tests/fsdp_cpu.py`` gives its state what it
gives on GPUs for the same config (see there), and reports how many parameter elements each process
holds, so these tests know the run was sharded. The runs must match one unsharded process (the global
batch is the same), write ordinary model directories and checkpoints, and resume exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from icot.cli import main
from icot.config import load_config, save_config
from icot.data import parse_line
from icot.data.multiplication import generate_examples
from icot.errors import ConfigError
from icot.models.lm import load_lm_dir
from icot.rundir import CHECKPOINT, STATE_FILE, stage_is_done
from icot.training import loop, stages
from icot.training.resume import OPTIMIZER_FILE

ACCELERATE = Path(sys.executable).with_name("accelerate")
LAUNCHER = Path(__file__).with_name("fsdp_cpu.py")
SRC = Path(__file__).resolve().parents[1] / "src"
TOLERANCE = 1e-4  # two processes add the same numbers in another order
# What README.md shows, with the CPU test's sizes: FSDP2, full shard, one unit per GPT-2 block.
FSDP_CONFIG = """\
distributed_type: FSDP
num_machines: 1
num_processes: 2
mixed_precision: 'no'
dynamo_backend: 'NO'
fsdp_config:
  fsdp_version: 2
  fsdp_reshard_after_forward: true
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: GPT2Block
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SimpleNamespace:
    """A 2x2 task (41 validation lines: uneven shards), the accelerate config and two run configs: ``plain``
    (grad_accum 2, for the comparison with one process) and ``dropout`` (for resume: the RNG states matter)."""
    directory = tmp_path_factory.mktemp("fsdp")
    valid = generate_examples(2, 2, 41, seed=1)
    train = generate_examples(2, 2, 320, seed=2, exclude=[parse_line(x).input for x in valid])
    for name, lines in (("train", train), ("valid", valid)):
        (directory / f"{name}.txt").write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    section = {"batch_size": 16, "lr": 1e-3, "max_steps": 6, "eval_every": 3, "eval_examples": 21,
               "eval_batch_size": 8, "log_every": 1}
    data = {"train": str(directory / "train.txt"), "valid": str(directory / "valid.txt")}
    model = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64}
    plain = load_config(None, {"data": data, "model": model, "teacher": {**section, "grad_accum": 2}})
    dropout = load_config(None, {"data": data, "model": {**model, "dropout": 0.1},
                                 "teacher": {**section, "save_every": 2}})
    save_config(plain, directory / "plain.yaml")
    save_config(dropout, directory / "dropout.yaml")
    (directory / "fsdp.yaml").write_text(FSDP_CONFIG, encoding="utf-8")
    return SimpleNamespace(dir=directory, plain=directory / "plain.yaml", dropout=directory / "dropout.yaml",
                           accelerate=directory / "fsdp.yaml")


def _launch(files: SimpleNamespace, config: Path, out: Path, *flags: str, env: dict | None = None,
            stage: str = "teacher") -> subprocess.CompletedProcess:
    environ = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])), **(env or {})}
    return subprocess.run([str(ACCELERATE), "launch", "--config_file", str(files.accelerate), "--main_process_port",
                           str(_port()), str(LAUNCHER), "train", stage, "--config", str(config), "--out", str(out),
                           *flags], env=environ, capture_output=True, text=True, timeout=300)


def _assert_sharded(stderr: str) -> None:
    held = {int(rank): (int(local), int(whole))
            for rank, local, whole in re.findall(r"fsdp: rank (\d) holds (\d+) of (\d+) parameter elements", stderr)}
    assert set(held) == {0, 1}, stderr[-3000:]
    assert all(local < whole for local, whole in held.values())  # each process holds a part only
    assert sum(local for local, _ in held.values()) == held[0][1]  # and together, everything once


def _records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines]


def _assert_same_records(got: list[dict], want: list[dict], tolerance: float) -> None:
    assert [(r["event"], r["step"]) for r in got] == [(r["event"], r["step"]) for r in want]
    for a, b in zip(got, want):
        for key, value in b.items():
            expected = pytest.approx(value, rel=tolerance, abs=tolerance) if isinstance(value, float) else value
            assert a[key] == expected, (a["event"], a["step"], key)


def _difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((x.float() - b[k].float()).abs().max().item() for k, x in a.items())


def _best(out: Path, stage: str = "teacher") -> dict[str, torch.Tensor]:
    model, _, meta = load_lm_dir(out / "best")
    assert meta["stage"] == stage
    return model.state_dict()


@pytest.mark.slow
def test_fsdp_trains_like_one_process_and_saves_a_model_directory(files, tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", "teacher", "--config", str(files.plain), "--out", str(one)]) == 0
    one_result = json.loads(capsys.readouterr().out)

    proc = _launch(files, files.plain, two)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_sharded(proc.stderr)
    assert json.loads(proc.stdout)["steps"] == one_result["steps"] == 6  # one result: the main process printed
    assert stage_is_done(two)

    _assert_same_records(_records(two), _records(one), TOLERANCE)
    validations = [r for r in _records(two) if r["event"] == "validate"]
    assert all(r["val_examples"] == 41 and r["val_exact_examples"] == 21 for r in validations)
    # The best model is an ordinary Hugging Face directory: whole tensors, the model's own class name.
    hf_config = json.loads((two / "best" / "config.json").read_text(encoding="utf-8"))
    assert hf_config["architectures"] == ["GPT2LMHeadModel"]
    trained, reference = _best(two), _best(one)
    difference = _difference(trained, reference)
    print(f"1 process vs 2 FSDP processes: max |weight difference| {difference:.3g}")
    assert difference <= TOLERANCE
    untrained = stages.build("teacher", load_config(files.plain)).module.state_dict()
    assert _difference(trained, untrained) > 1e-3  # it trained


@pytest.mark.slow
def test_fsdp_interrupt_and_resume_equals_an_uninterrupted_run(files, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "resumed"
    proc = _launch(files, files.dropout, reference)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # SIGTERM reaches process 0 only, in step 4: both processes stop after it and save (a 4-step checkpoint
    # replaces the one of step 2).
    proc = _launch(files, files.dropout, out, env={"ICOT_TEST_SIGTERM_AT": "4"})
    _assert_sharded(proc.stderr)
    assert proc.returncode != 0 and "interrupted by SIGTERM at step 4" in proc.stderr, proc.stderr[-3000:]
    checkpoint = out / CHECKPOINT
    assert json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))["position"]["step"] == 4
    # The checkpoint holds whole tensors, as an unsharded run's: Adam's moments have the parameters' shapes.
    shapes = [tuple(p.shape) for p in stages.build("teacher", load_config(files.dropout)).module.parameters()]
    optimizer = load_file(str(checkpoint / OPTIMIZER_FILE))
    assert [tuple(optimizer[f"state.{i}.exp_avg"].shape) for i in range(len(shapes))] == shapes

    proc = _launch(files, files.dropout, out, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_sharded(proc.stderr)
    assert not checkpoint.exists() and stage_is_done(out)
    _assert_same_records(_records(out), _records(reference), 1e-6)
    difference = _difference(_best(out), _best(reference))
    print(f"FSDP resumed at step 4 vs uninterrupted: max |weight difference| {difference:.3g}")
    assert difference <= 1e-6


@pytest.mark.slow
def test_fsdp_stepwise_with_optimizer_resets_trains_like_one_process(files, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    assert main(["train", "teacher", "--config", str(files.plain), "--out", str(teacher)]) == 0
    config = load_config(files.plain, {"stepwise": {"batch_size": 16, "lr": 1e-3, "max_steps": 12, "eval_every": 4,
                                                    "eval_examples": 21, "eval_batch_size": 8, "log_every": 1,
                                                    "save_every": 4},
                                       "si": {"remove_per_epoch": 8, "steps_per_epoch": 4}})  # a token a step
    save_config(config, tmp_path / "stepwise.yaml")
    one, two = tmp_path / "one", tmp_path / "two"
    flags = ["--config", str(tmp_path / "stepwise.yaml"), "--teacher", str(teacher)]
    assert main(["train", "stepwise", *flags, "--out", str(one)]) == 0
    capsys.readouterr()
    proc = _launch(files, tmp_path / "stepwise.yaml", two, "--teacher", str(teacher), stage="stepwise")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_sharded(proc.stderr)
    records = _records(two)
    assert sum(r["event"] == "optimizer_reset" for r in records) >= 8
    _assert_same_records(records, _records(one), TOLERANCE)
    assert _difference(_best(two, "stepwise"), _best(one, "stepwise")) <= TOLERANCE


class _FSDPAccelerator:
    """What an accelerate config with ``distributed_type: FSDP`` gives, as far as the refusal looks."""

    version = 2

    def __init__(self, **kwargs):
        self.distributed_type = DistributedType.FSDP
        self.state = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=self.version))


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("icot: error: "), lines
    return lines[0]


def test_student_under_fsdp_is_refused_in_one_line(tiny_config, tmp_path, monkeypatch, capsys):
    teacher = tmp_path / "teacher"
    quick = dataclasses.replace(tiny_config, teacher=dataclasses.replace(tiny_config.teacher, max_steps=2))
    stages.run("teacher", quick, teacher, progress=False)
    save_config(tiny_config, tmp_path / "c.yaml")
    monkeypatch.setattr(loop, "Accelerator", _FSDPAccelerator)
    capsys.readouterr()
    argv = ["train", "student", "--config", str(tmp_path / "c.yaml"), "--teacher", str(teacher), "--out",
            str(tmp_path / "student")]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "is FSDP, which stage 'student' does not support" in line and "--multi_gpu" in line


def test_fsdp_version_1_is_refused_in_one_line(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "Accelerator", type("FSDP1", (_FSDPAccelerator,), {"version": 1}))
    with pytest.raises(ConfigError, match="fsdp_version' of the accelerate config is 1.*fsdp_version: 2") as info:
        stages.run("teacher", tiny_config, tmp_path / "t", progress=False)
    assert "\n" not in str(info.value)


def test_only_the_plain_causal_lm_stages_shard():
    from icot.training import couple, emulator, student
    from icot.training.causal_lm import CausalLMStage
    from icot.training.stepwise import StepwiseStage

    assert CausalLMStage.shardable and StepwiseStage.shardable  # teacher and nocot are CausalLMStages
    assert not any(c.shardable for c in (student.StudentStage, emulator.EmulatorStage, couple.CoupleStage))
