"""Tests of icot.evaluation: stopping, padding, batched greedy decoding and exact-match accuracy."""

from __future__ import annotations

import json

import pytest
import torch

from icot.data import Example, parse_line, read_examples, read_inputs
from icot.data.multiplication import generate_examples
from icot.errors import CheckpointError
from icot.evaluation import LMPredictor, Prediction, digit_accuracy, evaluate, evaluate_sizes, load_predictor
from icot.generation import left_pad
from icot.models.lm import load_lm_dir
from icot.tokenizer import Layout

EOS = 0


def _inputs(config, n=20) -> list[Example]:
    return read_examples(config.data.valid)[:n]


def _predict_in_batches(predictor, inputs, batch_size):
    return [p for i in range(0, len(inputs), batch_size) for p in predictor.predict(inputs[i:i + batch_size])]


@pytest.fixture(scope="module")
def predictors(trained_teacher, trained_nocot):
    return {"teacher": load_predictor(str(trained_teacher), max_new_tokens=24),
            "nocot": load_predictor(str(trained_nocot), max_new_tokens=24)}


@pytest.mark.parametrize("name", ["teacher", "nocot"])
def test_batched_predictions_equal_batch_one(predictors, session_config, name):
    predictor = predictors[name]
    inputs = [ex.input for ex in _inputs(session_config)]
    one = _predict_in_batches(predictor, inputs, 1)
    seven = _predict_in_batches(predictor, inputs, 7)  # 7 + 7 + 6: uneven batches
    assert len(one) == len(seven) == 20
    assert seven == one
    # Not a vacuous comparison: the model's output depends on its input.
    texts = {(p.cot, p.answer) for p in one}
    assert len(texts) > 1
    if name == "nocot":
        assert all(p.cot == "" for p in one)
    else:
        assert all(p.cot for p in one)


class _PartlyRight:
    """A predictor that answers every third input right (with odd spacing) and the others wrong."""

    def __init__(self, examples):
        self.truth = {ex.input: ex.answer for ex in examples}
        self.seen: list[str] = []

    def predict(self, inputs):
        answers = []
        for x in inputs:
            i = len(self.seen)
            self.seen.append(x)
            truth = self.truth[x]
            if i % 3 == 0:
                answers.append(Prediction("", "  " + truth.replace(" ", "  ") + " "))  # spacing is not an error
            elif i % 3 == 1:
                answers.append(Prediction("", truth + " 0"))
            else:
                answers.append(Prediction("some cot", ""))
        return answers


def test_evaluate_counts_exact_matches(session_config):
    examples = read_examples(session_config.data.valid)
    predictor = _PartlyRight(examples)
    result = evaluate(predictor, examples, batch_size=4, progress=False, warmup=False)
    right = sum(1 for i in range(len(examples)) if i % 3 == 0)
    assert result["n"] == len(examples) and result["correct"] == right
    assert result["accuracy"] == pytest.approx(right / len(examples))
    assert result["batch_size"] == 4 and result["examples_per_second"] > 0
    assert predictor.seen == [ex.input for ex in examples]  # each input once, in order, no CoT given

    limited = evaluate(_PartlyRight(examples), examples, batch_size=3, limit=7, progress=False, warmup=False)
    assert limited["n"] == 7 and limited["correct"] == sum(1 for i in range(7) if i % 3 == 0)
    # The warm-up batch is decoded but not counted.
    warm = _PartlyRight(examples)
    result = evaluate(warm, examples, batch_size=5, limit=10, progress=False, warmup=True)
    assert len(warm.seen) == 15 and result["n"] == 10


def test_digit_accuracy_scores_each_place_and_counts_missing_tokens_wrong():
    predicted = ["1 2 3", "1 9", "", "7 2 3 4"]
    references = ["1 2 3", "1 2 3", "4 5", "1 2 3"]
    # place 0: right in rows 0, 1 of 4; place 1: rows 0, 3 of 4; place 2: rows 0, 3 of the 3 references that
    # have one (row 1's is missing, so wrong); row 3's extra token costs nothing
    assert digit_accuracy(predicted, references) == [pytest.approx(2 / 4), pytest.approx(2 / 4), pytest.approx(2 / 3)]
    with pytest.raises(ValueError):
        digit_accuracy(["1"], ["1", "2"])


def test_evaluate_reports_the_digit_accuracy_of_its_predictions(session_config):
    examples = read_examples(session_config.data.valid)
    result = evaluate(_PartlyRight(examples), examples, batch_size=4, progress=False, warmup=False)
    # _PartlyRight's answers: right, right digits with an extra one (wrong as a whole), empty; in turn.
    digits = len(examples[0].answer.split())
    right_digits = sum(1 for i in range(len(examples)) if i % 3 != 2) / len(examples)
    assert result["digit_accuracy"] == [pytest.approx(right_digits)] * digits
    assert result["accuracy"] < right_digits


def test_evaluate_refuses_no_examples():
    with pytest.raises(ValueError):
        evaluate(_PartlyRight([]), [], progress=False)


@pytest.mark.parametrize("name", ["teacher", "nocot"])
def test_evaluate_on_trained_model(predictors, session_config, name):
    predictor = predictors[name]
    examples = _inputs(session_config)
    result = evaluate(predictor, examples, batch_size=5, progress=False)
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["n"] == len(examples) and result["examples_per_second"] > 0 and result["seconds"] > 0
    preds = _predict_in_batches(predictor, [ex.input for ex in examples], 1)
    hand = sum(p.answer.split() == ex.answer.split() for p, ex in zip(preds, examples))
    assert result["correct"] == hand
    assert result["accuracy"] == pytest.approx(hand / len(examples))


def test_load_predictor_on_stage_and_model_dirs(trained_teacher, trained_nocot, session_config):
    inputs = [ex.input for ex in _inputs(session_config, 6)]
    for stage_dir, with_cot in ((trained_teacher, True), (trained_nocot, False)):
        from_stage = load_predictor(str(stage_dir), max_new_tokens=20)
        from_model = load_predictor(str(stage_dir / "best"), max_new_tokens=20)
        assert isinstance(from_stage, LMPredictor)
        assert from_stage.with_cot is with_cot and from_stage.max_new_tokens == 20
        assert not from_stage.model.training
        model, tokenizer, _ = load_lm_dir(stage_dir / "best")
        model.eval()
        direct = LMPredictor(model, Layout(tokenizer), with_cot, max_new_tokens=20)
        assert from_stage.predict(inputs) == from_model.predict(inputs) == direct.predict(inputs)


def test_load_predictor_places_the_weights(trained_teacher, session_config):
    inputs = [ex.input for ex in _inputs(session_config, 6)]
    full = load_predictor(str(trained_teacher), max_new_tokens=20, device="cpu")
    half = load_predictor(str(trained_teacher), max_new_tokens=20, device="cpu", dtype="bfloat16")
    assert {(p.device.type, p.dtype) for p in full.model.parameters()} == {("cpu", torch.float32)}
    assert {(p.device.type, p.dtype) for p in half.model.parameters()} == {("cpu", torch.bfloat16)}
    ids, mask = left_pad([full.layout.prompt_ids(x) for x in inputs], full.layout.pad_id)
    with torch.no_grad():
        exact = full.model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        rounded = half.model(input_ids=ids, attention_mask=mask).logits
    # bfloat16 keeps 8 bits of mantissa: the logits move by a small fraction of their range, no more.
    assert rounded.dtype == torch.bfloat16
    assert (rounded.float() - exact).abs().max() <= 0.05 * (exact.max() - exact.min())
    assert len(half.predict(inputs)) == len(inputs)


def test_load_predictor_refuses_other_kinds(tmp_path):
    (tmp_path / "icot.json").write_text(json.dumps({"kind": "emulator"}), encoding="utf-8")
    with pytest.raises(CheckpointError, match="'emulator'"):
        load_predictor(str(tmp_path))
    with pytest.raises(CheckpointError):
        load_predictor(str(tmp_path / "nothing"))


def test_evaluate_sizes_scores_each_size_on_unseen_problems(predictors, session_config):
    train_inputs = read_inputs(session_config.data.train)
    rows = evaluate_sizes(predictors["nocot"], [(2, 2), (1, 2), (40, 40), (1, 1)], count=84, seed=3,
                          batch_size=42, exclude=[session_config.data.train], progress=False)
    assert [r["size"] for r in rows] == ["2x2", "1x2", "40x40", "1x1"]
    for row in rows[:2]:
        assert row["n"] == 84 and row["batch_size"] == 42 and 0 <= row["accuracy"] <= 1
        assert row["correct"] == round(row["accuracy"] * 84)
    # Reported, not scored, not skipped: 40x40 prompts (82 tokens) exceed the tiny model's context of 64,
    # and 1x1 has only 81 distinct problems.
    assert "accuracy" not in rows[2] and "no room to answer" in rows[2]["error"]
    assert "accuracy" not in rows[3] and "81" in rows[3]["error"]
    # The 2x2 problems avoid every training INPUT (only 81 * 90 exist, so the exclusion is tested for real).
    generated = {parse_line(line).input for line in generate_examples(2, 2, 84, 3, train_inputs)}
    assert not generated & train_inputs and len(generated) == 84


def test_evaluate_sizes_on_the_training_size_agrees_with_evaluate(predictors, session_config):
    lines = generate_examples(2, 2, 10, 5, read_inputs(session_config.data.train))
    by_size = evaluate_sizes(predictors["teacher"], [(2, 2)], count=10, seed=5, batch_size=5,
                             exclude=[session_config.data.train], progress=False)[0]
    direct = evaluate(predictors["teacher"], [parse_line(line) for line in lines], batch_size=5, progress=False)
    assert by_size["correct"] == direct["correct"]


def test_export_writes_a_smaller_model_that_answers_as_the_original_in_that_dtype(trained_teacher, session_config,
                                                                                   tmp_path):
    from safetensors import safe_open

    from icot.evaluation import export_model

    out = export_model(str(trained_teacher), tmp_path / "bf16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    original = trained_teacher / "best" / "model.safetensors"
    assert (out / "model.safetensors").stat().st_size < 0.6 * original.stat().st_size
    inputs = [ex.input for ex in read_examples(session_config.data.valid)[:20]]
    # The same bf16 weights: the same answers when both decode in bf16.
    exported = load_predictor(str(out), dtype="bfloat16").predict(inputs)
    reference = load_predictor(str(trained_teacher), dtype="bfloat16").predict(inputs)
    assert exported == reference
    assert load_lm_dir(out)[2]["layout"] == "explicit"  # icot.json went along
    with pytest.raises(CheckpointError, match="overwrite"):
        export_model(str(out), out)


@pytest.mark.parametrize("predicted, reference", [
    ("1000", "1,000"), ("1,000", "1000"), ("5.0", "5"), ("5", "5.00"), ("5.", "5"), (".5", "0.5"), ("0.50", ".5"),
    ("-3", "-3.0"), ("+7", "7"), ("-0", "0"), ("0.0", "0"), ("007", "7"), ("1,234,567.890", "1234567.89"),
    (" 300 ", "300"), ("1000", "1000.000"), ("-1,200", "-1200"),
    ("123456789012345678901234567890123", "123,456,789,012,345,678,901,234,567,890,123"),  # beyond 28 digits: exact
    ("1 3 9 4 5 4 2 1", "1  3 9 4 5 4 2 1"),  # multiplication answers: text, whitespace normalised
])
def test_answers_match_as_numbers_or_text(predicted, reference):
    from icot.evaluation import answers_match
    assert answers_match(predicted, reference)
    assert answers_match(reference, predicted)


@pytest.mark.parametrize("predicted, reference", [
    ("1000", "100"), ("5.01", "5"), ("-3", "3"), ("1,00", "100"),  # a misplaced comma is text, not a number
    ("1 3 9 4", "1394"), ("1 3 9 4", "1 3 9 5"), ("0 1", "1 0"), ("1e3", "1000"), ("$5", "5"), ("", "0"),
    ("123456789012345678901234567890123", "123456789012345678901234567890124"),  # no float rounding
    ("5", "five"), ("1,0000", "10000"),
])
def test_answers_differ(predicted, reference):
    from icot.evaluation import answers_match
    assert not answers_match(predicted, reference)
    assert not answers_match(reference, predicted)


@pytest.mark.parametrize("text, value", [("1,000", "1000"), ("5.0", "5"), ("-3", "-3"), ("2.50", "2.5"), ("-0.0", "0"),
                                         ("1E+3", None), ("1 3", None), ("+", None), (".", None), ("-", None),
                                         ("abc", None), ("12,34", None)])
def test_numeric_value_and_canonical_form(text, value):
    from icot.evaluation import normalize_answer, numeric_value
    assert (numeric_value(text) is None) == (value is None)
    if value is not None:
        assert normalize_answer(text) == value


def test_evaluate_counts_numerically_equal_answers():
    examples = [Example("q1", "<<1*1000=1000>>", "1,000"), Example("q2", "", "5"), Example("q3", "", "7"),
                Example("q4", "", "1 2")]
    answers = {"q1": "1000", "q2": "5.0", "q3": "8", "q4": "1  2"}

    class Fixed:
        def predict(self, inputs):
            return [Prediction("", answers[x]) for x in inputs]

    result = evaluate(Fixed(), examples, batch_size=2, progress=False, warmup=False)
    assert result["correct"] == 3
