"""Tests of the command line (icot.cli.main): data, train, eval, predict, and one-line errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from icot.cli import build_parser, main
from icot.config import load_config, save_config
from icot.data import read_examples, read_inputs
from icot.devices import decode_device
from icot.evaluation import load_predictor
from icot.rundir import read_meta, stage_is_done
from icot.training import stages


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("icot: error:")]


@pytest.fixture
def config_file(tiny_config, tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    save_config(tiny_config, path)
    return path


@pytest.fixture
def bad_data(tmp_path, mult_files) -> Path:
    """A data file whose line 2 has no '||'."""
    lines = mult_files[1].read_text(encoding="utf-8").splitlines()[:3]
    lines[1] = lines[1].replace("||", " ")
    path = tmp_path / "bad.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_data_mult(mult_files, tmp_path, capsys):
    _, valid = mult_files
    out = tmp_path / "gen" / "train.txt"
    assert main(["data", "mult", "--digits", "2", "--count", "50", "--seed", "5", "--out", str(out),
                 "--exclude", str(valid)]) == 0
    examples = read_examples(out)
    assert len(examples) == 50
    assert len({ex.input for ex in examples}) == 50
    assert not {ex.input for ex in examples} & read_inputs(valid)
    assert all(len(ex.input.split()) == 5 and len(ex.answer.split()) == 4 for ex in examples)
    stats = json.loads(capsys.readouterr().out)
    assert stats["count"] == 50 and stats["path"] == str(out)
    assert stats["excluded_inputs"] == len(read_inputs(valid))


def test_data_mult_other_width(tmp_path, capsys):
    out = tmp_path / "t.txt"
    assert main(["data", "mult", "--digits", "3", "--digits-b", "2", "--count", "7", "--out", str(out)]) == 0
    examples = read_examples(out)
    assert len(examples) == 7
    assert all(len(ex.input.split()) == 3 + 1 + 2 and len(ex.answer.split()) == 5 for ex in examples)


def test_data_gsm8k(tmp_path, capsys):
    original = tmp_path / "orig.txt"
    original.write_text(
        "Tom has 3 apples and buys 4 more. How many?||He has 3+4=<<3+4=7>>7 apples. #### 7\n"
        "A box holds 6 eggs. How many in 5 boxes?||6*5=<<6*5=30>>30 eggs, then 30-2=<<30-2=28>>28. #### 28\n"
        "What is one and one?||It is two. #### 2\n",
        encoding="utf-8",
    )
    out = tmp_path / "gsm.txt"
    assert main(["data", "gsm8k", "--in", str(original), "--out", str(out)]) == 0
    examples = read_examples(out)
    assert [ex.cot for ex in examples] == ["<<3+4=7>>", "<<6*5=30>> <<30-2=28>>"]
    assert [ex.answer for ex in examples] == ["7", "28"]
    assert examples[0].input == "Tom has 3 apples and buys 4 more. How many?"
    summary = capsys.readouterr().out
    assert "wrote 2 of 3" in summary and "line 3" in summary


def test_train_eval_predict(config_file, tiny_config, tmp_path, capsys):
    out = tmp_path / "teacher"
    assert main(["train", "teacher", "--config", str(config_file), "--out", str(out),
                 "--teacher.max_steps", "4", "--teacher.eval_every=2", "--teacher.lr", "2e-3",
                 "--teacher.log-every", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 4 and result["examples"] == 4 * tiny_config.teacher.batch_size
    assert stage_is_done(out) and read_meta(out)["stage"] == "teacher"
    saved = load_config(out / "config.yaml")
    assert (saved.teacher.max_steps, saved.teacher.eval_every, saved.teacher.log_every) == (4, 2, 1)
    assert saved.teacher.lr == pytest.approx(2e-3)
    assert saved.data == tiny_config.data and saved.model == tiny_config.model
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [m["step"] for m in metrics if m["event"] == "train"] == [1, 2, 3, 4]

    valid = tiny_config.data.valid
    report = tmp_path / "reports" / "eval.json"
    assert main(["eval", "--model", str(out), "--data", valid, "--limit", "5", "--batch-size", "2",
                 "--max-new-tokens", "20", "--json", str(report)]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(report.read_text(encoding="utf-8"))
    assert printed == written
    assert written["n"] == 5 and written["batch_size"] == 2
    assert 0.0 <= written["accuracy"] <= 1.0 and written["examples_per_second"] > 0
    assert written["accuracy"] == pytest.approx(written["correct"] / 5)
    assert (written["model"], written["data"]) == (str(out), valid)
    assert written["device"] == str(decode_device("auto")) and written["dtype"] == "float32"
    assert main(["eval", "--model", str(out), "--data", valid, "--limit", "2", "--device", "cpu", "--dtype",
                 "bfloat16"]) == 0
    assert {k: v for k, v in json.loads(capsys.readouterr().out).items() if k in ("device", "dtype")} == \
        {"device": "cpu", "dtype": "bfloat16"}
    assert main(["eval", "--model", str(out), "--data", valid, "--device", "gpu0"]) == 2
    assert "'gpu0', which is not a torch device" in capsys.readouterr().err

    inputs = [ex.input for ex in read_examples(valid)[:2]]
    expected = load_predictor(str(out), max_new_tokens=20).predict(inputs)
    assert main(["predict", "--model", str(out), "--max-new-tokens", "20", inputs[0]]) == 0
    lines = capsys.readouterr().out.splitlines()
    want = ([f"cot: {expected[0].cot}"] if expected[0].cot else []) + [f"answer: {expected[0].answer}"]
    assert lines == want
    assert main(["predict", "--model", str(out), "--max-new-tokens", "20", *inputs]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if not x.startswith("cot: ")]
    assert lines == [f"{x} => {p.answer}" for x, p in zip(inputs, expected)]


def test_malformed_train_file_is_one_line_error(config_file, bad_data, tmp_path, capsys):
    code = main(["train", "teacher", "--config", str(config_file), "--out", str(tmp_path / "t"),
                 "--data.train", str(bad_data)])
    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("icot: error: ")
    assert f"{bad_data}:2:" in lines[0] and "'||'" in lines[0]
    assert not stage_is_done(tmp_path / "t")


def test_malformed_exclude_file_is_one_line_error(bad_data, tmp_path, capsys):
    code = main(["data", "mult", "--digits", "2", "--count", "5", "--out", str(tmp_path / "x.txt"),
                 "--exclude", str(bad_data)])
    assert code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and f"{bad_data}:2:" in lines[0]
    assert not (tmp_path / "x.txt").exists()


def test_malformed_eval_file_is_one_line_error(trained_nocot, bad_data, capsys):
    code = main(["eval", "--model", str(trained_nocot), "--data", str(bad_data)])
    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    errors = _error_lines(captured.err)
    assert len(errors) == 1 and f"{bad_data}:2:" in errors[0]
    assert captured.err.rstrip("\n").endswith(errors[0])


def test_missing_data_file_is_an_error(trained_nocot, tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    assert main(["eval", "--model", str(trained_nocot), "--data", str(missing)]) == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and str(missing) in errors[0]


def test_unknown_config_field_flag(config_file, tmp_path, capsys):
    code = main(["train", "teacher", "--config", str(config_file), "--out", str(tmp_path / "t"),
                 "--teacher.lrr", "1e-3"])
    assert code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "'teacher.lrr'" in lines[0]
    assert not (tmp_path / "t").exists()


def test_unknown_config_field_in_file(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  n_layers: 2\n", encoding="utf-8")
    assert main(["train", "nocot", "--config", str(path), "--out", str(tmp_path / "t")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "'model.n_layers'" in lines[0] and str(path) in lines[0]


def test_wrong_type_override(config_file, tmp_path, capsys):
    assert main(["train", "teacher", "--config", str(config_file), "--out", str(tmp_path / "t"),
                 "--model.n_layer", "two"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "'model.n_layer'" in lines[0]


def test_stage_needing_a_teacher_says_so(config_file, tmp_path, capsys):
    assert main(["train", "student", "--config", str(config_file), "--out", str(tmp_path / "s")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "--teacher" in lines[0]


def test_extra_arguments_are_refused_outside_train(trained_nocot, capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval", "--model", str(trained_nocot), "--data", "x.txt", "--teacher.lr", "1"])
    assert info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_too_little_training_data_is_one_line_error(config_file, tmp_path, capsys):
    assert main(["train", "teacher", "--config", str(config_file), "--out", str(tmp_path / "t"),
                 "--data.max_train_examples", "5"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "batch" in lines[0]


def test_train_refuses_to_replace_a_run_without_overwrite(config_file, tmp_path, capsys):
    out = tmp_path / "teacher"
    args = ["train", "teacher", "--config", str(config_file), "--out", str(out), "--teacher.max_steps", "2",
            "--teacher.eval_every", "0"]
    assert main(args) == 0
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    # A finished stage, under its own name or another stage's, is not retrained over.
    assert main(args) == 2
    assert "holds a done 'teacher' stage: pass --resume to continue it or --overwrite" in capsys.readouterr().err
    nocot = ["train", "nocot", "--config", str(config_file), "--out", str(out), "--nocot.max_steps", "2"]
    assert main(nocot) == 2
    assert (out / "metrics.jsonl").read_text() == before and read_meta(out)["stage"] == "teacher"
    assert main(args + ["--resume", "--overwrite"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    # An unfinished run with a checkpoint: refused too, so that its checkpoint survives.
    meta = read_meta(out)
    (out / "icot.json").write_text(json.dumps({**meta, "status": "running"}))
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "trainer_state.json").write_text("{}")
    assert main(args) == 2
    assert "an unfinished 'teacher' run with a checkpoint" in capsys.readouterr().err
    assert (out / "checkpoint" / "trainer_state.json").is_file()
    # --overwrite replaces it.
    assert main(args + ["--overwrite", "--teacher.seed", "3"]) == 0
    assert load_config(out / "config.yaml").teacher.seed == 3 and stage_is_done(out)


def test_gsm8k_conversion_refuses_to_overwrite_its_source(tmp_path, capsys):
    source = tmp_path / "train.txt"
    source.write_text("Q||A <<1+1=2>> #### 2\n")
    assert main(["data", "gsm8k", "--in", str(source), "--out", str(tmp_path / "." / "train.txt")]) == 2
    assert "would overwrite its source" in capsys.readouterr().err
    assert source.read_text() == "Q||A <<1+1=2>> #### 2\n"


@pytest.mark.parametrize("flag, value", [("--batch-size", "-1"), ("--batch-size", "0"), ("--limit", "-1"),
                                         ("--max-new-tokens", "0"), ("--batch-size", "two")])
def test_eval_numeric_options_are_range_checked(trained_nocot, flag, value, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["eval", "--model", str(trained_nocot), "--data", "unused.txt", flag, value])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and ("must be >=" in err or "expected an integer" in err)


def test_predict_refuses_an_empty_input(trained_nocot, capsys):
    assert main(["predict", "--model", str(trained_nocot), "1 2 * 3 4", " "]) == 2
    assert "<input>:2: the INPUT is empty" in capsys.readouterr().err


def test_infinite_epochs_are_refused(config_file, tmp_path, capsys):
    assert main(["train", "teacher", "--config", str(config_file), "--out", str(tmp_path / "t"),
                 "--teacher.epochs", ".inf"]) == 2
    assert "teacher.epochs': must be > 0 and finite" in capsys.readouterr().err


def test_data_mult_refuses_a_count_that_cannot_fit_in_memory(tmp_path, capsys):
    out = tmp_path / "huge.txt"
    assert main(["data", "mult", "--digits", "19", "--count", "100000000000", "--out", str(out)]) == 2
    assert "GiB table of operand digits" in capsys.readouterr().err
    assert not out.exists()


def test_data_check_lists_bad_lines_and_exits_2(tmp_path, capsys):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    assert main(["data", "mult", "--digits", "2", "--count", "20", "--out", str(good)]) == 0
    lines = good.read_text(encoding="utf-8").splitlines()
    lines[6] = lines[6][:-1] + str((int(lines[6][-1]) + 1) % 10)  # the answer's last digit, off by one
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["data", "check", str(good)]) == 0
    assert main(["data", "check", str(good), str(bad)]) == 2
    out, err = capsys.readouterr()
    assert out.splitlines() == [line for line in out.splitlines() if line.startswith(f"{bad}:7: ANSWER does not follow")]
    assert len(out.splitlines()) == 1 and f"{bad}: 20 lines, 1 bad" in err and f"{good}: 20 lines, 0 bad" in err


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield name, child
                yield from _subparsers(child)


def test_every_option_has_help_and_the_overrides_are_explained():
    parser = build_parser()
    assert "``" not in parser.description and "ICoT-SI" in parser.description
    commands = dict(_subparsers(parser))
    for name, child in commands.items():
        for action in child._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    for name in ("train", "pipeline"):
        assert "--SECTION.FIELD VALUE" in commands[name].description
    assert "icot-si" in commands["pipeline"].description
    assert tuple(commands["train"]._actions[1].choices) == stages.ORDER  # the CLI's stages are the registry's


def test_pipeline_accepts_resume(tmp_path, capsys):
    args, extra = build_parser().parse_known_args(["pipeline", "c.yaml", "--out", str(tmp_path), "--resume"])
    assert args.resume and extra == []


def test_eval_by_operand_size(trained_nocot, tiny_config, tmp_path, capsys):
    out = tmp_path / "sizes.json"
    assert main(["eval", "--model", str(trained_nocot), "--sizes", "2x2,1x2", "--count", "6",
                 "--exclude", tiny_config.data.train, "--json", str(out)]) == 0
    capsys.readouterr()
    result = json.loads(out.read_text())
    assert [r["size"] for r in result["by_size"]] == ["2x2", "1x2"] and all(r["n"] == 6 for r in result["by_size"])
    assert main(["eval", "--model", str(trained_nocot), "--sizes", "2by2"]) == 2
    assert _error_lines(capsys.readouterr().err) == ["icot: error: <input>: --sizes: size '2by2' is not NxM with N, M >= 1 digits (e.g. 3x4)"]
    with pytest.raises(SystemExit):  # --data and --sizes exclude each other
        main(["eval", "--model", str(trained_nocot), "--sizes", "2x2", "--data", tiny_config.data.valid])


def test_data_gsm8k_excludes_the_test_questions(tmp_path, capsys):
    original = tmp_path / "orig.txt"
    original.write_text("Q one?||1+1=<<1+1=2>>2 #### 2\nQ two?||2*3=<<2*3=6>>6 #### 6\nQ three?||It is 3. #### 3\n",
                        encoding="utf-8")
    test = tmp_path / "test.txt"
    test.write_text("Q two?||<<2*3=6>> #### 6\n", encoding="utf-8")
    out = tmp_path / "train.txt"
    assert main(["data", "gsm8k", "--in", str(original), "--out", str(out), "--exclude", str(test)]) == 0
    assert [ex.input for ex in read_examples(out)] == ["Q one?"]
    assert "1 excluded" in capsys.readouterr().out
    assert main(["data", "gsm8k", "--in", str(original), "--out", str(out), "--exclude", str(test),
                 "--keep-unannotated"]) == 0
    assert [(ex.input, ex.cot) for ex in read_examples(out, allow_empty_cot=True)] == [("Q one?", "<<1+1=2>>"),
                                                                                        ("Q three?", "")]
