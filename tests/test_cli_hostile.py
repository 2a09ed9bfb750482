"""Hostile input and checkpoints that do not fit, through the command line: always exit 2 and one line
naming the file (and the line or field), never a traceback."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from icot.cli import main
from icot.config import save_config
from icot.data import Example, read_examples
from icot.models.emulator import ThoughtEmulator
from icot.models.lm import build_gpt2, load_lm_dir
from icot.models.student import MindReadingStudent
from icot.tokenizer import build_word_tokenizer


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = [x for x in captured.err.splitlines() if x.startswith("icot: error: ")]
    assert len(lines) == 1, captured.err
    assert captured.err.rstrip("\n").endswith(lines[0])  # the error is the last thing said
    return lines[0]


@pytest.fixture
def config_file(tiny_config, tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    save_config(tiny_config, path)
    return path


def _with_line(valid: Path, tmp_path: Path, number: int, line: bytes) -> Path:
    """A copy of the first lines of ``valid`` whose line ``number`` (1-based) is replaced by ``line``."""
    lines = valid.read_bytes().splitlines()[:4]
    lines[number - 1] = line
    path = tmp_path / "hostile.txt"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


GOOD = b"9 1 * 3 4||7 2 + 0 6 3 #### 7 8 3 0"
MALFORMED = {
    "no '||'": (b"9 1 * 3 4 7 2 + 0 6 3 #### 7 8 3 0", "'||'"),
    "no '####'": (b"9 1 * 3 4||7 2 + 0 6 3 7 8 3 0", "'####'"),
    "empty answer": (b"9 1 * 3 4||7 2 + 0 6 3 ####", "empty ANSWER"),
    "empty input": (b"||7 2 + 0 6 3 #### 7 8 3 0", "empty INPUT"),
    "blank line": (b"   ", "blank line"),
    "non-UTF-8 byte": (b"9 1 * 3 \xff||7 2 + 0 6 3 #### 7 8 3 0", "UTF-8"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_training_line(case, config_file, mult_files, tmp_path, capsys):
    line, problem = MALFORMED[case]
    bad = _with_line(mult_files[1], tmp_path, 3, line)
    assert main(["train", "teacher", "--config", str(config_file), "--out", str(tmp_path / "t"),
                 "--data.train", str(bad)]) == 2
    message = _one_error_line(capsys)
    assert f"{bad}:3:" in message and problem in message


def test_empty_data_file(config_file, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert main(["train", "nocot", "--config", str(config_file), "--out", str(tmp_path / "t"),
                 "--data.valid", str(empty)]) == 2
    assert f"{empty}: no examples" in _one_error_line(capsys)


def test_unknown_symbol_for_a_from_scratch_vocabulary(config_file, mult_files, tmp_path, capsys):
    bad = _with_line(mult_files[1], tmp_path, 2, GOOD.replace(b"9 1", b"9 x"))  # 'x' never occurs in training
    assert main(["train", "teacher", "--config", str(config_file), "--out", str(tmp_path / "t"),
                 "--data.valid", str(bad)]) == 2
    message = _one_error_line(capsys)
    assert f"{bad}:2:" in message and "'x'" in message


def test_training_sequence_longer_than_the_context(config_file, tmp_path, capsys):
    assert main(["train", "teacher", "--config", str(config_file), "--out", str(tmp_path / "t"),
                 "--model.n_positions", "8"]) == 2
    message = _one_error_line(capsys)
    assert "line 1 is" in message and "model.n_positions" in message


def test_eval_with_non_digit_multiplication_input(trained_teacher, mult_files, tmp_path, capsys):
    bad = _with_line(mult_files[1], tmp_path, 2, GOOD.replace(b"3 4", b"3 a"))
    assert main(["eval", "--model", str(trained_teacher), "--data", str(bad)]) == 2
    message = _one_error_line(capsys)
    assert f"{bad}:2:" in message and "'a'" in message


def test_eval_with_an_input_longer_than_the_context(trained_teacher, mult_files, tmp_path, capsys):
    long_input = b" ".join([b"9"] * 70) + b" * 3 4"
    bad = _with_line(mult_files[1], tmp_path, 4, long_input + b"||1 #### 2")
    assert main(["eval", "--model", str(trained_teacher), "--data", str(bad), "--limit", "4"]) == 2
    message = _one_error_line(capsys)
    assert f"{bad}:4:" in message and "context of 64" in message


@pytest.mark.parametrize("text,problem", [("9 1 * 3 z", "'z'"), (" ".join(["9"] * 70), "context of 64")])
def test_predict_refuses_unreadable_input(trained_teacher, text, problem, capsys):
    assert main(["predict", "--model", str(trained_teacher), "9 1 * 3 4", text]) == 2
    message = _one_error_line(capsys)
    assert "<input>:2:" in message and problem in message


def test_config_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"teacher:\n  lr: \xff\n")
    assert main(["train", "teacher", "--config", str(path), "--out", str(tmp_path / "t")]) == 2
    assert str(path) in _one_error_line(capsys)


# ---------------------------------------------------------------------------------------------
# Checkpoints and saved configs that do not fit


def _copy_model(trained: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(trained / "best", copy)
    return copy


def test_weights_only_from_safetensors(trained_teacher, tmp_path, capsys):
    model = _copy_model(trained_teacher, tmp_path)
    lm, _, _ = load_lm_dir(model)
    (model / "model.safetensors").unlink()
    torch.save(lm.state_dict(), model / "pytorch_model.bin")  # the format that can run code when loaded
    assert main(["eval", "--model", str(model), "--data", "unused.txt"]) == 2
    message = _one_error_line(capsys)
    assert str(model) in message and "model.safetensors" in message


def test_corrupt_tokenizer(trained_teacher, tmp_path, capsys):
    model = _copy_model(trained_teacher, tmp_path)
    (model / "tokenizer.json").write_text('{"truncated": ', encoding="utf-8")
    assert main(["predict", "--model", str(model), "9 1 * 3 4"]) == 2
    assert f"{model}: cannot load the tokenizer" in _one_error_line(capsys)


def test_weights_that_do_not_fit_their_config(trained_teacher, tmp_path, capsys):
    model = _copy_model(trained_teacher, tmp_path)
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    config["vocab_size"] = 5
    (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert main(["predict", "--model", str(model), "9 1 * 3 4"]) == 2
    message = _one_error_line(capsys)
    assert str(model) in message and "does not fit config.json" in message


def test_tokenizer_larger_than_the_model_vocabulary(trained_teacher, mult_files, tmp_path, capsys):
    model = _copy_model(trained_teacher, tmp_path)
    examples = read_examples(mult_files[0]) + [Example("a b c d e f", "g h", "i j")]
    build_word_tokenizer(examples).save_pretrained(model)
    assert main(["predict", "--model", str(model), "9 1 * 3 4"]) == 2
    message = _one_error_line(capsys)
    assert str(model) in message and "field vocab_size" in message


def test_teacher_and_student_of_different_layer_counts(config_file, trained_teacher, tmp_path, capsys):
    assert main(["train", "student", "--config", str(config_file), "--teacher", str(trained_teacher),
                 "--out", str(tmp_path / "s"), "--kd.init_from_teacher", "false", "--model.n_layer", "3"]) == 2
    message = _one_error_line(capsys)
    assert str(trained_teacher / "best" / "config.json") in message and "'n_layer'" in message


def test_student_and_emulator_of_different_hidden_sizes(config_file, trained_teacher, tiny_config, tmp_path, capsys):
    _, tokenizer, _ = load_lm_dir(trained_teacher / "best")
    student = MindReadingStudent(build_gpt2(tiny_config.model, tokenizer))
    wider = ThoughtEmulator(build_gpt2(dataclasses.replace(tiny_config.model, n_embd=48), tokenizer))
    student.save_pretrained(tmp_path / "student", tokenizer)
    wider.save_pretrained(tmp_path / "emulator", tokenizer)
    assert main(["train", "couple", "--config", str(config_file), "--student", str(tmp_path / "student"),
                 "--emulator", str(tmp_path / "emulator"), "--out", str(tmp_path / "c")]) == 2
    message = _one_error_line(capsys)
    assert str(tmp_path / "emulator" / "config.json") in message and "'hidden_size'" in message


@pytest.mark.parametrize("section,problem", [("teacher:\n  lrr: 0.1\n", "'teacher.lrr'"),
                                             ("teacher:\n  lr: 5.0\n", "'teacher.lr'")])
def test_saved_config_with_a_bad_field(config_file, tmp_path, section, problem, capsys):
    run = tmp_path / "run"
    (run / "teacher").mkdir(parents=True)
    (run / "teacher" / "icot.json").write_text(json.dumps({"kind": "stage", "status": "done", "model": "best"}),
                                               encoding="utf-8")
    (run / "teacher" / "config.yaml").write_text(section, encoding="utf-8")
    assert main(["pipeline", str(config_file), "--out", str(run), "--methods", '["explicit"]']) == 2
    message = _one_error_line(capsys)
    assert str(run / "teacher" / "config.yaml") in message and problem in message
