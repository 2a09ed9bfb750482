"""Multi-process training: two CPU processes (gloo, ``accelerate launch``) train like one process.

The global batch is the same, so the losses, the validation metrics and the weights agree to float
tolerance; validation is sharded and every example counts exactly once, an uneven last shard included.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from icot.cli import main
from icot.config import load_config, save_config
from icot.data import parse_line
from icot.data.multiplication import generate_examples
from icot.errors import ConfigError
from icot.models.lm import load_lm_dir
from icot.training import distributed, loop
from icot.training.loop import Stage, train_stage

ACCELERATE = Path(sys.executable).with_name("accelerate")
N_VALID, N_EXACT = 41, 21  # odd: the two processes get 20 and 21 (10 and 11) validation lines
TOLERANCE = 1e-4  # the two runs add the same numbers in another order


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 2, 5, 41])
def test_shards_cover_every_item_once(monkeypatch, n, size):
    items = list(range(n))
    shards = []
    for rank in range(size):
        monkeypatch.setattr(distributed, "process_state", lambda: SimpleNamespace(num_processes=size, process_index=rank))
        shards.append(list(distributed.shard(items)))
    assert [x for s in shards for x in s] == items  # in order, no duplicate, no drop
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize("completed", [True, False])
def test_end_process_group_tears_down_the_group_a_launch_formed(tmp_path, monkeypatch, completed):
    distributed.end_process_group(completed)  # no group: nothing to do
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    barriers = []
    barrier = torch.distributed.barrier
    monkeypatch.setattr(torch.distributed, "barrier", lambda: barriers.append(barrier()))
    try:
        distributed.end_process_group(completed)
        assert not torch.distributed.is_initialized()
        assert len(barriers) == int(completed)  # only a completed command waits for the other processes
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config_file(tmp_path: Path) -> Path:
    valid = generate_examples(2, 2, N_VALID, seed=1)
    train = generate_examples(2, 2, 320, seed=2, exclude=[parse_line(x).input for x in valid])
    for name, lines in (("train", train), ("valid", valid)):
        (tmp_path / f"{name}.txt").write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    section = {"batch_size": 16, "lr": 1e-3, "max_steps": 6, "eval_every": 3, "eval_examples": N_EXACT,
               "eval_batch_size": 8, "log_every": 1}
    config = load_config(None, {"data": {"train": str(tmp_path / "train.txt"), "valid": str(tmp_path / "valid.txt")},
                                "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64},
                                "teacher": section})
    save_config(config, tmp_path / "config.yaml")
    return tmp_path / "config.yaml"


def _records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path, capsys):
    config_file = _config_file(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", "teacher", "--config", str(config_file), "--out", str(one)]) == 0
    one_result = json.loads(capsys.readouterr().out)

    # On a machine without GPUs, Accelerate's multi-process launcher runs CPU processes over gloo.
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                           str(_free_port()), "-m", "icot.cli", "train", "teacher", "--config", str(config_file),
                           "--out", str(two), "--teacher.log_with", "tensorboard"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The tracker (a neutral field: same records) writes from the main process only (the events files,
    # the scalars' and the hparams' own, are named by the writing process) and leaves the process group be.
    writers = {path.name.split(".")[-2] for path in (two / "tracking").rglob("events.out.tfevents.*")}
    assert len(writers) == 1
    # One JSON result: only the main process prints. Two processes that failed to form a group would each
    # think themselves main, train alone and print twice.
    two_result = json.loads(proc.stdout)

    got, want = _records(two), _records(one)
    assert [(r["event"], r["step"]) for r in got] == [(r["event"], r["step"]) for r in want]
    for a, b in zip(got, want):
        for key, value in b.items():
            expected = pytest.approx(value, rel=TOLERANCE, abs=TOLERANCE) if isinstance(value, float) else value
            assert a[key] == expected, (a["event"], a["step"], key)
    validations = [r for r in got if r["event"] == "validate"]
    assert [r["step"] for r in validations] == [3, 6]
    assert all(r["val_examples"] == N_VALID and r["val_exact_examples"] == N_EXACT for r in validations)
    assert two_result["steps"] == one_result["steps"] == 6
    assert two_result["examples"] == one_result["examples"] == 6 * 16

    a, _, _ = load_lm_dir(two / "best")
    b, _, _ = load_lm_dir(one / "best")
    difference = max((x - y).abs().max().item() for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    print(f"1 vs 2 processes: final train loss {want[-2]['loss']:.6f} vs {got[-2]['loss']:.6f}, "
          f"val loss {validations[-1]['val_loss']:.6f}, max |weight difference| {difference:.3g}")
    assert difference <= TOLERANCE
    assert not torch.equal(a.transformer.wte.weight, torch.zeros_like(a.transformer.wte.weight))


@pytest.mark.parametrize("kind", ["DEEPSPEED", "MEGATRON_LM"])
def test_sharded_setups_other_than_fsdp_are_refused_in_one_line(kind, tiny_config, tmp_path, monkeypatch):
    class ShardedAccelerator:  # what an accelerate config with distributed_type DeepSpeed / Megatron-LM gives
        def __init__(self, **kwargs):
            self.distributed_type = getattr(DistributedType, kind)

    monkeypatch.setattr(loop, "Accelerator", ShardedAccelerator)
    with pytest.raises(ConfigError, match="field 'distributed_type'.*DDP or FSDP only") as info:
        train_stage(Stage(), tiny_config.teacher, tmp_path, tiny_config, progress=False)
    assert "\n" not in str(info.value)


def test_fsdp_is_refused_in_one_line_for_a_stage_that_does_not_shard(tiny_config, tmp_path, monkeypatch):
    class FSDPAccelerator:
        def __init__(self, **kwargs):
            self.distributed_type = DistributedType.FSDP

    monkeypatch.setattr(loop, "Accelerator", FSDPAccelerator)
    with pytest.raises(ConfigError, match="is FSDP, which stage 'stage' does not support") as info:
        train_stage(Stage(), tiny_config.teacher, tmp_path, tiny_config, progress=False)
    assert "\n" not in str(info.value)
