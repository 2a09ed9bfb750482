"""Tests of icot.models.lm: from-scratch GPT-2, pretrained directories, model directories."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from icot.errors import CheckpointError
from icot.generation import context_length
from icot.models.lm import build_gpt2, hidden_size, load_lm_dir, load_pretrained_lm, n_layers, save_lm_dir
from icot.rundir import read_meta, save_atomically
from icot.tokenizer import build_word_tokenizer, load_tokenizer
from icot.training.causal_lm import load_split, starting_lm


@pytest.fixture
def train_examples(tiny_config):
    return load_split(tiny_config, "train")


@pytest.fixture
def tokenizer(train_examples):
    return build_word_tokenizer(train_examples)


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _some_ids(tokenizer, n=12):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, len(tokenizer), (2, n), generator=g)


def test_build_gpt2_shape_from_config(tiny_config, tokenizer):
    model = build_gpt2(tiny_config.model, tokenizer)
    mc = tiny_config.model
    assert n_layers(model) == mc.n_layer == len(model.transformer.h)
    assert hidden_size(model) == mc.n_embd
    assert model.config.n_head == mc.n_head
    assert context_length(model) == mc.n_positions
    assert model.get_input_embeddings().weight.shape == (len(tokenizer), mc.n_embd)
    assert model.transformer.wpe.weight.shape == (mc.n_positions, mc.n_embd)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    ids = _some_ids(tokenizer)
    assert _logits(model, ids).shape == (*ids.shape, len(tokenizer))


def test_starting_lm_from_scratch_builds_vocab_from_train(tiny_config, train_examples):
    model, tok = starting_lm(tiny_config, train_examples)
    symbols = {s for ex in train_examples for p in (ex.input, ex.cot, ex.answer) for s in p.split()}
    assert len(tok) == len(symbols) + 3  # <|endoftext|>, <pad>, <unk>
    assert model.get_input_embeddings().num_embeddings == len(tok)


def test_starting_lm_loads_pretrained_directory(tiny_config, train_examples, tokenizer, tmp_path):
    torch.manual_seed(0)
    model = build_gpt2(tiny_config.model, tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config = dataclasses.replace(tiny_config, model=dataclasses.replace(tiny_config.model, name_or_path=str(tmp_path),
                                                                        n_layer=5))  # shape fields are ignored
    loaded, loaded_tok = starting_lm(config, train_examples)
    assert n_layers(loaded) == tiny_config.model.n_layer
    assert loaded_tok.get_vocab() == tokenizer.get_vocab()
    ids = _some_ids(tokenizer)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_pretrained_without_pad_gets_tokenizer_pad(tokenizer, tmp_path):
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=16, n_layer=1, n_head=2)
    model = GPT2LMHeadModel(config)
    model.config.pad_token_id = None
    model.save_pretrained(tmp_path)
    loaded = load_pretrained_lm(tmp_path, tokenizer)
    assert loaded.config.pad_token_id == tokenizer.pad_token_id


def test_tokenizer_larger_than_model_vocab_is_refused(tokenizer, tmp_path):
    config = GPT2Config(vocab_size=len(tokenizer) - 2, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_pretrained_lm(tmp_path, load_tokenizer(tmp_path))
    assert str(info.value).startswith(f"{tmp_path}: ")
    assert "vocab_size" in str(info.value)


def test_model_vocab_larger_than_tokenizer_is_fine(tokenizer, tmp_path):
    # Pretrained models often pad their embedding (GPT-2: 50257 tokens); extra rows are never produced as input.
    config = GPT2Config(vocab_size=len(tokenizer) + 5, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    assert load_pretrained_lm(tmp_path, tokenizer).get_input_embeddings().num_embeddings == len(tokenizer) + 5


def test_lm_dir_round_trip(tiny_config, tokenizer, tmp_path):
    torch.manual_seed(1)
    model = build_gpt2(tiny_config.model, tokenizer)
    save_lm_dir(tmp_path / "m", model, tokenizer, {"layout": "nocot"}, tiny_config)
    loaded, loaded_tok, meta = load_lm_dir(tmp_path / "m")
    assert meta == {"kind": "lm", "layout": "nocot"}
    assert (tmp_path / "m" / "config.yaml").is_file()
    assert loaded_tok.get_vocab() == tokenizer.get_vocab()
    ids = _some_ids(tokenizer)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_load_lm_dir_refuses_other_kinds(tiny_config, tokenizer, tmp_path):
    with pytest.raises(CheckpointError, match="icot.json"):
        load_lm_dir(tmp_path)  # empty dir
    (tmp_path / "icot.json").write_text('{"kind": "student"}', encoding="utf-8")
    with pytest.raises(CheckpointError, match="'student'"):
        load_lm_dir(tmp_path)
    (tmp_path / "icot.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        read_meta(tmp_path)


def _write(content: str):
    def write(tmp):
        (tmp / "a.txt").write_text(content, encoding="utf-8")
    return write


def test_save_atomically_replaces_directory(tmp_path):
    out = tmp_path / "best"
    save_atomically(out, _write("one"))
    assert (out / "a.txt").read_text(encoding="utf-8") == "one"
    (out / "stale.txt").write_text("old file", encoding="utf-8")
    save_atomically(out, _write("two"))
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]  # replaced, not merged
    assert (out / "a.txt").read_text(encoding="utf-8") == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no temporary or old directory left


def test_save_atomically_keeps_old_directory_when_writer_fails(tmp_path):
    out = tmp_path / "best"
    save_atomically(out, _write("good"))

    def failing(tmp):
        (tmp / "a.txt").write_text("half written", encoding="utf-8")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_atomically(out, failing)
    assert (out / "a.txt").read_text(encoding="utf-8") == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    # A failure on the first save leaves nothing behind.
    with pytest.raises(RuntimeError):
        save_atomically(tmp_path / "fresh", failing)
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def _copy_model(trained_nocot, tmp_path):
    import shutil

    from icot.rundir import model_path

    target = tmp_path / "model"
    shutil.copytree(model_path(trained_nocot), target)
    return target


def test_truncated_weights_are_one_checkpoint_error(trained_nocot, tmp_path):
    from icot.errors import CheckpointError
    from icot.models.lm import load_lm_dir

    model = _copy_model(trained_nocot, tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot load the model: SafetensorError"):
        load_lm_dir(model)


def test_config_that_does_not_match_the_weights_is_refused(trained_nocot, tmp_path):
    import json

    from icot.errors import CheckpointError
    from icot.models.lm import load_lm_dir

    model = _copy_model(trained_nocot, tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "n_layer": config["n_layer"] + 1}))
    with pytest.raises(CheckpointError, match="does not match model.safetensors .* e.g. transformer.h.2"):
        load_lm_dir(model)


def test_stage_meta_without_model_and_a_nocot_teacher_are_refused(trained_nocot, tmp_path):
    import json
    import shutil

    from icot.errors import CheckpointError
    from icot.models.lm import require_explicit
    from icot.rundir import model_path, read_meta

    stage = tmp_path / "stage"
    shutil.copytree(trained_nocot, stage)
    meta = read_meta(stage)
    with pytest.raises(CheckpointError, match="not a teacher: its layout is 'nocot'"):
        require_explicit(read_meta(model_path(stage)), stage)
    (stage / "icot.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "model"}))
    with pytest.raises(CheckpointError, match="lacks field 'model'"):
        model_path(stage)
