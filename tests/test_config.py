"""Tests of icot.config: defaults, YAML files, flag overrides, type/range errors and round trips."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

import icot.config
import icot.devices
from icot.config import (
    METHODS,
    GenerateConfig,
    IcotConfig,
    TrainConfig,
    load_config,
    output_settings,
    parse_sizes,
    save_config,
)
from icot.errors import ConfigError


def test_defaults_are_valid():
    config = load_config(None)
    assert config == IcotConfig()
    # Every training section is a fully checked TrainConfig with the dataclass defaults.
    for name in ("teacher", "nocot", "student", "emulator", "couple"):
        assert getattr(config, name) == TrainConfig()
    assert config.methods == list(METHODS)


def test_yaml_file_sets_fields(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "data:\n  train: a.txt\n  valid: b.txt\n  max_train_examples: 100\n"
        "model:\n  n_layer: 3\n  n_embd: 48\n  n_head: 4\n  dropout: 0.1\n"
        "teacher:\n  batch_size: 8\n  lr: 0.0005\n  epochs: 2\n"
        "kd:\n  subset: last_column\n"
        "methods: [nocot, explicit]\n",
        encoding="utf-8",
    )
    config = load_config(path)
    assert (config.data.train, config.data.valid, config.data.max_train_examples) == ("a.txt", "b.txt", 100)
    assert (config.model.n_layer, config.model.n_embd, config.model.n_head) == (3, 48, 4)
    assert config.model.dropout == pytest.approx(0.1)
    assert config.teacher.batch_size == 8 and config.teacher.lr == pytest.approx(5e-4)
    # `epochs: 2` is an int in YAML; the field is a float.
    assert isinstance(config.teacher.epochs, float) and config.teacher.epochs == 2.0
    assert config.kd.subset == "last_column"
    assert config.methods == ["nocot", "explicit"]
    # Untouched sections keep their defaults.
    assert config.nocot == TrainConfig()


def test_empty_yaml_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    assert load_config(path) == IcotConfig()


def test_flag_overrides():
    config = load_config(None, ["--teacher.lr", "1e-3", "--data.test", "FILE", "--model.n_layer=3",
                                "--nocot.max-steps", "7"])
    assert isinstance(config.teacher.lr, float) and config.teacher.lr == pytest.approx(1e-3)
    assert config.data.test == "FILE"
    assert config.model.n_layer == 3
    assert config.nocot.max_steps == 7
    # Only the named fields changed.
    assert config.nocot.lr == TrainConfig().lr
    assert config.student == TrainConfig()


def test_flag_values_take_their_field_type():
    # `--key value` and `--key=value` alike; each value is read for its field's type.
    config = load_config(None, ["--teacher.lr", "1e-3", "--data.test=f.txt", "--eval.limit", "5"])
    assert (config.teacher.lr, config.data.test, config.eval.limit) == (1e-3, "f.txt", 5)


def test_overrides_win_over_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("teacher:\n  lr: 0.01\n  batch_size: 8\n", encoding="utf-8")
    config = load_config(path, ["--teacher.lr", "2e-4"])
    assert config.teacher.lr == pytest.approx(2e-4)
    assert config.teacher.batch_size == 8  # merged, not replaced


@pytest.mark.parametrize("bad", [["teacher.lr", "1"], ["--teacher.lr"]])
def test_malformed_override_flags(bad):
    with pytest.raises(ConfigError):
        load_config(None, bad)


def test_exponent_without_dot_in_yaml_is_a_float(tmp_path):
    # PyYAML (YAML 1.1) reads `1e-3` as the string "1e-3".
    path = tmp_path / "run.yaml"
    path.write_text("teacher:\n  lr: 1e-3\nmodel:\n  dropout: 5e-2\n", encoding="utf-8")
    config = load_config(path)
    assert isinstance(config.teacher.lr, float) and config.teacher.lr == pytest.approx(1e-3)
    assert isinstance(config.model.dropout, float) and config.model.dropout == pytest.approx(5e-2)


def test_unknown_field_names_field_and_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("teacher:\n  lrr: 0.001\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "teacher.lrr" in str(info.value)
    assert str(info.value).startswith(f"{path}: ")
    assert info.value.path == str(path)


def test_unknown_section_names_it():
    with pytest.raises(ConfigError, match="'teachr'"):
        load_config(None, {"teachr": {"lr": 0.1}})


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        # wrong type
        ("model:\n  n_layer: three\n", "model.n_layer"),
        ("model:\n  n_layer: true\n", "model.n_layer"),
        ("model:\n  n_layer: 2.5\n", "model.n_layer"),
        ("teacher:\n  lr: fast\n", "teacher.lr"),
        ("data:\n  train: [a, b]\n", "data.train"),
        ("methods: nocot\n", "methods"),
        ("model: 3\n", "model"),
        ("data:\n  generate: {digits: 4, train_count: many}\n", "data.generate.train_count"),  # in a nullable section
        ("data:\n  generate: {digits: true}\n", "data.generate.digits"),
        # out of range
        ("model:\n  n_layer: 0\n", "model.n_layer"),
        ("model:\n  n_embd: 30\n  n_head: 4\n", "model.n_embd"),
        ("model:\n  dropout: 1.0\n", "model.dropout"),
        ("model:\n  tokenizer: chars\n", "model.tokenizer"),
        ("data:\n  max_train_examples: 0\n", "data.max_train_examples"),
        ("kd:\n  subset: diagonalish\n", "kd.subset"),
        ("kd:\n  delta: -2\n", "kd.delta"),
        ("eval:\n  batch_size: 0\n", "eval.batch_size"),
        ("methods: [nocot, magic]\n", "methods"),
    ],
)
def test_wrong_type_or_range_names_field_and_file(tmp_path, yaml_text, field):
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"'{field}'" in str(info.value)
    assert str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize(
    ("section", "values", "field"),
    [
        ("teacher", {"lr": 2.0}, "teacher.lr"),
        ("nocot", {"batch_size": 0}, "nocot.batch_size"),
        ("student", {"batch_size": 10, "grad_accum": 3}, "student.batch_size"),
    ],
)
def test_out_of_range_training_field_names_its_section(section, values, field):
    with pytest.raises(ConfigError) as info:
        load_config(None, {section: values})
    assert f"'{field}'" in str(info.value)


def test_out_of_range_training_field_is_rejected():
    # Whatever the name in the message, the value must not be accepted.
    for values in ({"lr": 2.0}, {"batch_size": 0}, {"eval_examples": 0}, {"mixed_precision": "fp8"}):
        with pytest.raises(ConfigError):
            load_config(None, {"teacher": values})


def test_eval_dtype_is_checked():
    assert load_config(None, {"eval": {"dtype": "bfloat16"}}).eval.dtype == "bfloat16"
    with pytest.raises(ConfigError, match="eval.dtype"):
        load_config(None, {"eval": {"dtype": "fp8"}})


@pytest.mark.parametrize("name", ["yes", "010", "null"])
def test_string_override_keeps_raw_text(name):
    assert load_config(None, ["--data.test", name]).data.test == name


def test_save_then_load_round_trips(tmp_path):
    config = load_config(None, {
        "data": {"train": "t.txt", "valid": "v.txt", "test": "x.txt", "max_train_examples": 12},
        "model": {"n_layer": 2, "n_embd": 32, "n_head": 2, "dropout": 0.1, "tokenizer": "bpe",
                  "name_or_path": ""},
        "teacher": {"lr": 1e-3, "batch_size": 16, "grad_accum": 2, "max_minutes": 0.5, "epochs": 1.5},
        "couple": {"init_from": "runs/x", "mixed_precision": "bf16"},
        "kd": {"subset": "top_row", "delta": "3", "mixture_size": 4, "init_from_teacher": False},
        "eval": {"limit": 9},
        "methods": ["icot-kd"],
    })
    path = tmp_path / "saved.yaml"
    save_config(config, path)
    again = load_config(path)
    assert again == config
    assert dataclasses.asdict(again) == dataclasses.asdict(config)
    # Defaults round trip too (None and empty strings included).
    save_config(IcotConfig(), path)
    assert load_config(path) == IcotConfig()


def test_a_key_given_twice_in_the_yaml_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("teacher: {lr: 1.0e-3}\nnocot: {lr: 2.0e-3}\nteacher: {lr: 5.0e-4}\n")
    with pytest.raises(ConfigError, match="key 'teacher' given twice \\(line 3\\)") as e:
        load_config(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    path.write_text("teacher: {lr: 1.0e-3, lr: 2.0e-3}\n")
    with pytest.raises(ConfigError, match="key 'lr' given twice"):
        load_config(path)


def test_eval_sizes_are_checked_when_the_config_loads():
    assert load_config(None, {"eval": {"sizes": ["3x3", "4X5"]}}).eval.sizes == ["3x3", "4X5"]
    assert parse_sizes("3x3, 4X5") == [(3, 3), (4, 5)]
    for bad in (["3by3"], ["0x3"], ["3x"]):
        with pytest.raises(ConfigError, match="field 'eval.sizes'"):
            load_config(None, {"eval": {"sizes": bad}})
    with pytest.raises(ConfigError, match="eval.sizes_count"):
        load_config(None, {"eval": {"sizes_count": 0}})


@pytest.mark.parametrize(("key", "choices"), [
    ("teacher.lr_schedule", "'constant', 'linear', 'cosine'"),
    ("couple.mixed_precision", "'no', 'fp16', 'bf16', 'auto'"),
    ("nocot.log_with", "'', 'tensorboard', 'wandb', 'mlflow'"),
    ("model.tokenizer", "'word', 'bpe'"),
    ("kd.subset", "'diagonal', 'first_column', 'last_column', 'top_row', 'bottom_row'"),
    ("eval.dtype", "'float32', 'bfloat16', 'float16'"),
    ("methods", "'nocot', 'explicit', 'icot-kd', 'icot-si'"),
])
def test_a_value_outside_the_choices_names_them(tmp_path, key, choices):
    section, _, name = key.partition(".")
    path = tmp_path / "run.yaml"
    path.write_text(f"{section}:\n  {name}: magic\n" if name else f"{section}: [nocot, magic]\n", encoding="utf-8")
    for load in (lambda: load_config(path), lambda: load_config(None, [f"--{key}", "[magic]" if not name else "magic"])):
        with pytest.raises(ConfigError) as info:
            load()
        message = str(info.value)
        assert f"field '{key}': " in message and f"one of {choices}" in message and "magic" in message
        assert "\n" not in message


def test_kd_delta_is_dynamic_or_a_positive_integer(tmp_path):
    assert load_config(None).kd.delta == "dynamic"
    assert load_config(None, ["--kd.delta", "3"]).kd.delta == 3
    assert load_config(None, {"kd": {"delta": 2}}).kd.delta == 2
    # A config.yaml saved when delta was a string field still loads, as the integer.
    path = tmp_path / "old.yaml"
    path.write_text("kd:\n  delta: '4'\n", encoding="utf-8")
    config = load_config(path)
    assert config.kd.delta == 4
    save_config(config, path)
    assert "delta: 4\n" in path.read_text(encoding="utf-8") and load_config(path) == config
    for bad, problem in (("0", "must be 'dynamic' or a positive integer"), ("-2", "must be 'dynamic' or a positive"),
                         ("dynamical", "expected an integer or one of 'dynamic', got dynamical"), ("2.5", "expected an integer")):
        with pytest.raises(ConfigError, match=f"field 'kd.delta': {problem}"):
            load_config(None, ["--kd.delta", bad])


@pytest.mark.parametrize("section", ["teacher", "nocot", "student", "emulator", "couple", "stepwise"])
def test_range_errors_name_every_training_section(tmp_path, section):
    path = tmp_path / "run.yaml"
    path.write_text(f"{section}:\n  epochs: 0\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=f"^{path}: field '{section}.epochs': must be > 0 and finite$"):
        load_config(path)
    with pytest.raises(ConfigError, match=f"field '{section}.lr': must be in"):
        load_config(None, [f"--{section}.lr", "2"])
    # Replacing a section re-checks it under its own name too.
    config = IcotConfig()
    with pytest.raises(ConfigError, match=f"field '{section}.batch_size': must be > 0"):
        dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), batch_size=0)})


def _float_fields(cls=IcotConfig, prefix=""):
    for f in dataclasses.fields(cls):
        value = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(value):
            yield from _float_fields(type(value), f"{prefix}{f.name}.")
        elif isinstance(value, float):
            yield f"{prefix}{f.name}"


@pytest.mark.parametrize("key", list(_float_fields()))
def test_nan_is_refused_in_every_number_field(key):
    with pytest.raises(ConfigError, match=f"field '{key}'"):
        load_config(None, [f"--{key}", ".nan"])


def test_infinity_is_a_number():
    assert load_config(None, ["--si.removal_smoothing_lambda", ".inf"]).si.removal_smoothing_lambda == float("inf")


@pytest.mark.parametrize(("overrides", "problem"), [
    ({"data": {"train": None}}, "field 'data.train': expected a string, got None"),
    ({"teacher": {"lr": None}}, "field 'teacher.lr': expected a number, got None"),
    ({"teacher": 3}, "field 'teacher': expected a mapping, got 3"),
    ({"data": {"generate": {"digits": 0}}}, "field 'data.generate.digits': must be > 0"),
    (["--emulator.patience", "-1"], "field 'emulator.patience': must be >= 0"),
    ({"data": {"max_train_examples": 2.5}}, "field 'data.max_train_examples': expected an integer or null, got 2.5"),
    ({"teacher": {"compile": 1}}, "field 'teacher.compile': expected true or false, got 1"),
    (["--teacher.compile", "1"], "field 'teacher.compile': expected true or false, got 1"),
    (["--teacher.lrr", "1"], "unknown field 'teacher.lrr' (known: batch_size, compile, "),
    (["--data.test", "-x"], "override '--data.test': missing value (write --data.test=VALUE"),
])
def test_one_line_errors(overrides, problem):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert str(info.value).startswith(f"<input>: {problem}") and "\n" not in str(info.value)


def test_optional_fields_take_null():
    config = load_config(None, ["--data.max_train_examples", "null", "--data.test", "null"])
    assert config.data.max_train_examples is None and config.data.test == "null"
    assert load_config(None, ["--data.generate.digits", "3"]).data.generate.digits == 3
    assert load_config(None, {"data": {"generate": None}}).data.generate is None


def test_flag_inside_a_section_the_yaml_set_changes_that_field_only(tmp_path):
    """`--data.generate.train_count` over a YAML `data.generate` once failed to instantiate."""
    path = tmp_path / "c.yaml"
    path.write_text("data: {generate: {digits: 4, train_count: 80800, seed: 3}}\nteacher: {lr: 1.0e-3}\n")
    config = load_config(path, ["--data.generate.train_count", "3000", "--teacher.lr=5e-4", "--data.generate.seed=7"])
    assert config.data.generate == GenerateConfig(digits=4, train_count=3000, seed=7)
    assert config.teacher.lr == 5e-4
    with pytest.raises(ConfigError, match=r"field 'data.generate.train_count': expected an integer, got 'many'$"):
        load_config(path, ["--data.generate.train_count", "many"])
    with pytest.raises(ConfigError, match=r"field 'data.generate.digits': must be > 0"):
        load_config(path, ["--data.generate.digits=0"])


@pytest.mark.parametrize("section, field_name, value", [
    ("teacher", "lr_schedule", "step"), ("couple", "mixed_precision", "fp8"), ("model", "tokenizer", "char"),
    ("kd", "subset", "middle"), ("eval", "dtype", "int8")])
def test_choices_are_checked_for_a_config_changed_in_code(section, field_name, value):
    config = load_config(None)
    changed = dataclasses.replace(getattr(config, section), **{field_name: value})
    with pytest.raises(ConfigError, match=rf"field '{section}.{field_name}': must be one of .*got '{value}'"):
        dataclasses.replace(config, **{section: changed})
    with pytest.raises(ConfigError, match=r"field 'methods': must be one of .*got 'magic'"):
        dataclasses.replace(config, methods=["nocot", "magic"])


@pytest.mark.parametrize("native, resolved", [(True, "bf16"), (False, "no")])
def test_output_settings_give_the_mixed_precision_auto_resolves_to(monkeypatch, native, resolved):
    monkeypatch.setattr(icot.devices, "cpu_runs_bf16_natively", lambda: (native, ""))
    monkeypatch.setattr(icot.config, "process_state", lambda: types.SimpleNamespace(device=torch.device("cpu")))
    config = load_config(None, {"teacher": {"mixed_precision": "auto"}, "nocot": {"mixed_precision": "bf16"}})
    settings = output_settings(config, ("teacher", "nocot"))
    assert settings["teacher.mixed_precision"] == resolved and settings["nocot.mixed_precision"] == "bf16"
