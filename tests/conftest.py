"""Shared tiny fixtures: 2x2 multiplication files, a tiny config, and tiny trained stages.

Everything is sized to run in seconds on two shared CPU cores: GPT-2 with 2 layers, 32 dims and
2 heads, a few hundred training lines, 20 (or, for the shared trained models, 200) optimizer steps.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from icot.config import IcotConfig, load_config
from icot.data import parse_line
from icot.data.multiplication import generate_examples

# Two shared cores and a background job: one intra-op thread keeps timings stable and fair.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

N_TRAIN = 320
N_VALID = 40

TRAIN_SECTION = {
    "batch_size": 16,
    "lr": 1e-3,
    "max_steps": 20,
    "eval_every": 10,
    "eval_examples": 20,
    "eval_batch_size": 20,
    "log_every": 5,
}

TINY_MODEL = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64}


def write_mult_files(directory: Path) -> tuple[Path, Path]:
    """A 2x2 validation file and a training file (another seed) that excludes its inputs."""
    directory.mkdir(parents=True, exist_ok=True)
    valid_lines = generate_examples(2, 2, N_VALID, seed=1)
    valid_inputs = [parse_line(line).input for line in valid_lines]
    train_lines = generate_examples(2, 2, N_TRAIN, seed=2, exclude=valid_inputs)
    train, valid = directory / "train.txt", directory / "valid.txt"
    train.write_text("".join(line + "\n" for line in train_lines), encoding="utf-8")
    valid.write_text("".join(line + "\n" for line in valid_lines), encoding="utf-8")
    return train, valid


def tiny_overrides(train: Path, valid: Path) -> dict:
    return {
        "data": {"train": str(train), "valid": str(valid), "test": str(valid)},
        "model": dict(TINY_MODEL),
        "teacher": dict(TRAIN_SECTION),
        "nocot": dict(TRAIN_SECTION),
        "eval": {"batched_size": 0, "max_new_tokens": 32},
    }


@pytest.fixture
def mult_files(tmp_path) -> tuple[Path, Path]:
    """``(train, valid)``: 320 and 40 distinct 2x2 lines; no valid INPUT occurs in train."""
    return write_mult_files(tmp_path / "data")


@pytest.fixture
def tiny_config(mult_files) -> IcotConfig:
    """A tiny run config pointing at ``mult_files`` (test = valid)."""
    return load_config(None, tiny_overrides(*mult_files))


@pytest.fixture(scope="session")
def session_data(tmp_path_factory) -> tuple[Path, Path]:
    return write_mult_files(tmp_path_factory.mktemp("session_data"))


@pytest.fixture(scope="session")
def session_config(session_data) -> IcotConfig:
    """Like ``tiny_config``, but 200 steps at a higher rate: the models' outputs depend on their input."""
    overrides = tiny_overrides(*session_data)
    for section in ("teacher", "nocot"):
        overrides[section].update(max_steps=200, lr=3e-3, eval_every=100, epochs=100.0)
    return load_config(None, overrides)


def _trained(name: str, config: IcotConfig, tmp_path_factory, **dirs: Path) -> Path:
    """Stage ``name`` trained into a fresh directory, reading the stage directories ``dirs``."""
    from icot.training import stages

    out = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)  # the from-scratch model is drawn from the global RNG: same model whatever ran before
    stages.run(name, config, out, progress=False, **{k: str(v) for k, v in dirs.items()})
    return out


@pytest.fixture(scope="session")
def trained_teacher(session_config, tmp_path_factory) -> Path:
    """A teacher stage directory trained for 200 steps (shared by the tests that only read it)."""
    return _trained("teacher", session_config, tmp_path_factory)


@pytest.fixture(scope="session")
def trained_nocot(session_config, tmp_path_factory) -> Path:
    """A no-CoT stage directory trained for 200 steps."""
    return _trained("nocot", session_config, tmp_path_factory)


KD_SECTION = {"batch_size": 16, "lr": 1e-3, "max_steps": 6, "eval_every": 0, "eval_examples": 8,
              "eval_batch_size": 8, "log_every": 2}


@pytest.fixture(scope="session")
def kd_config(session_config) -> IcotConfig:
    """The session config with short student / emulator / couple sections."""
    sections = {name: dataclasses.replace(getattr(session_config, name), **KD_SECTION)
                for name in ("student", "emulator", "couple")}
    return dataclasses.replace(session_config, **sections)


@pytest.fixture(scope="session")
def student_dir(kd_config, trained_teacher, tmp_path_factory) -> Path:
    """A student stage directory (6 steps against ``trained_teacher``)."""
    return _trained("student", kd_config, tmp_path_factory, teacher=trained_teacher)


@pytest.fixture(scope="session")
def emulator_dir(kd_config, trained_teacher, tmp_path_factory) -> Path:
    """An emulator stage directory (6 steps against ``trained_teacher``)."""
    return _trained("emulator", kd_config, tmp_path_factory, teacher=trained_teacher)


def _never_eos(model, token_id: int) -> None:
    """Make a GPT-2's greedy decoding always pick ``token_id`` (never <eos>), whatever the input."""
    with torch.no_grad():
        model.get_input_embeddings().weight[token_id] = 1.0
        model.get_output_embeddings().weight[token_id] = 1.0  # the same tensor when tied
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)  # every position's final state is all ones


@pytest.fixture
def never_eos():
    """``never_eos(model, token_id)``: an untrained-like GPT-2 that rambles and never ends."""
    return _never_eos
