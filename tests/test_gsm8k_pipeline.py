"""GSM8K end to end at tiny scale: BPE from scratch, numeric answers, the mixture emulator, variable-length CoTs,
and the pretrained path (``model.name_or_path``: a local Llama-shaped directory written by ``save_pretrained``)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from icot.config import load_config
from icot.data import read_examples
from icot.evaluation import load_predictor
from icot.pipeline import run_pipeline

SECTION = {"batch_size": 8, "lr": 1e-3, "max_steps": 3, "eval_every": 0, "eval_examples": 4, "eval_batch_size": 4,
           "log_every": 1}


def gsm8k_lines(n: int, seed: int) -> list[str]:
    """GSM8K-Aug-format lines (``QUESTION||<<a+b=c>> [<<c*d=e>>] #### ANSWER``): one or two equations, so the
    CoTs differ in length, and answers of four digits or more written with thousands commas, as GSM8K does."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b, d = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 40)
        if rng.random() < 0.5:
            question, cot, answer = f"Tom has {a} apples and buys {b} more. How many apples does he have?", \
                f"<<{a}+{b}={a + b}>>", a + b
        else:
            question = f"A box holds {a} eggs and {b} more are added. How many eggs are in {d} such boxes?"
            cot, answer = f"<<{a}+{b}={a + b}>> <<{a + b}*{d}={(a + b) * d}>>", (a + b) * d
        lines.append(f"{question}||{cot} #### {answer:,}")
    return lines


def write_gsm8k(directory: Path) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n, seed in (("train", 48, 0), ("valid", 8, 1), ("test", 6, 2)):
        paths[split] = str(directory / f"{split}.txt")
        Path(paths[split]).write_text("".join(x + "\n" for x in gsm8k_lines(n, seed)), encoding="utf-8")
    return paths


def save_tiny_pretrained(directory: Path, texts: list[str], kind: str = "llama") -> Path:
    """A 2-layer, 32-wide Llama- or Mistral-shaped causal LM and a byte-level BPE tokenizer (``</s>`` as eos, no pad
    token), both written by ``save_pretrained``: what a downloaded pretrained model's directory looks like."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    assert tokenizer.pad_token is None  # Llama's own tokenizer has none either
    shape = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    if kind == "llama":
        LlamaForCausalLM(LlamaConfig(**shape)).save_pretrained(directory)
    else:  # a sliding window shorter than the explicit rows, so that the window is in force while training
        MistralForCausalLM(MistralConfig(**shape, sliding_window=64)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _config(paths: dict[str, str], model: dict, methods: list[str], **extra):
    return load_config(None, {
        "data": paths, "model": model,
        **{s: dict(SECTION) for s in ("teacher", "nocot", "student", "emulator", "couple")},
        # 48 lines / 8 = 6 steps per epoch; one CoT token per step, the longest CoT (about 30 tokens) gone by 40.
        "stepwise": {**SECTION, "max_steps": 48, "epochs": 10},
        "si": {"remove_per_epoch": 8, "steps_per_epoch": 8, "keep_position": False},
        "kd": {"mixture_size": 3}, "eval": {"batched_size": 4, "max_new_tokens": 48}, "methods": methods, **extra})


def _check_results(run: Path, methods: list[str], n_test: int) -> dict:
    results = json.loads((run / "results.json").read_text())
    names = {"nocot": "no-cot", "explicit": "explicit-cot", "icot-kd": "icot-kd", "icot-si": "icot-si"}
    rows = {r["method"]: r for r in results["rows"]}
    for m in methods:
        assert rows[names[m]]["n"] == n_test and 0.0 <= rows[names[m]]["accuracy"] <= 1.0
    return results


@pytest.mark.slow
def test_gsm8k_pipeline_from_scratch_with_bpe_and_the_mixture_emulator(tmp_path):
    paths = write_gsm8k(tmp_path / "data")
    model = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 160, "tokenizer": "bpe", "bpe_vocab_size": 400,
             "answer_marker": "####"}
    methods = ["nocot", "explicit", "icot-kd", "icot-si"]
    run = tmp_path / "run"
    run_pipeline(_config(paths, model, methods), run, progress=False)
    results = _check_results(run, methods, 6)
    assert results["stages"]["stepwise"]["steps"] == 48
    assert json.loads((run / "emulator" / "best" / "icot.json").read_text())["mixture_size"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_gsm8k_pipeline_from_a_pretrained_directory(tmp_path, kind):
    """``model.name_or_path`` = a local Llama- or Mistral-shaped directory: every stage (teacher, no-CoT, student,
    emulator with mixture components, couple, stepwise) trains on its decoder layers and rotary positions, and each
    method's model answers the test file."""
    paths = write_gsm8k(tmp_path / "data")
    texts = [line for split in ("train", "valid") for line in Path(paths[split]).read_text().splitlines()]
    llama = save_tiny_pretrained(tmp_path / kind, texts, kind)
    methods = ["nocot", "explicit", "icot-kd", "icot-si"]
    run = tmp_path / "run"
    run_pipeline(_config(paths, {"name_or_path": str(llama), "answer_marker": "####"}, methods), run, progress=False)
    _check_results(run, methods, 6)
    # Every stage's model has the pretrained model's architecture.
    for stage in ("teacher", "nocot", "stepwise"):
        assert json.loads((run / stage / "best" / "config.json").read_text())["model_type"] == kind
    # Left-padded batches (rotary positions counted from the attention mask) answer as rows decoded alone do.
    inputs = [ex.input for ex in read_examples(paths["test"])]
    for stage in ("teacher", "nocot", "implicit", "stepwise"):
        predictor = load_predictor(str(run / stage), max_new_tokens=24)
        one = [p for x in inputs for p in predictor.predict([x])]
        assert predictor.predict(inputs) == one, stage
