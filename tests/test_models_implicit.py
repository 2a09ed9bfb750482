"""Implicit model (emulator + student) on tiny random GPT-2 and Llama models with a real word-level tokenizer."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from icot.data import parse_line
from icot.data.multiplication import make_example
from icot.errors import CheckpointError
from icot.evaluation import ImplicitPredictor, load_predictor
from icot.generation import left_pad
from icot.models.emulator import ThoughtEmulator
from icot.models.implicit import ImplicitModel
from icot.models.student import MindReadingStudent
from icot.rundir import read_meta
from icot.tokenizer import Layout, build_word_tokenizer

L, H = 2, 32
# Inputs of two sizes, so that batches are really left-padded.
EXAMPLES = [parse_line(make_example(a, b, d, d))
            for a, b, d in ((12, 34, 2), (56, 78, 2), (123, 456, 3), (907, 305, 3), (40, 99, 2))]
MAX_NEW = 6


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(EXAMPLES)


def tiny_lm(arch: str, tokenizer, n_layer: int = L, hidden: int = H):
    # A large init spread: the default 0.02 makes a tiny random model say the same thing whatever the input.
    ids = {"bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id, "initializer_range": 0.5}
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=hidden, n_head=2, vocab_size=len(tokenizer),
                                          n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids))
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=n_layer, hidden_size=hidden, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=64, vocab_size=len(tokenizer),
                                        max_position_embeddings=64, **ids))


@pytest.fixture(params=["gpt2", "llama"])
def model(request, tokenizer) -> ImplicitModel:
    torch.manual_seed(0)
    emulator = ThoughtEmulator(tiny_lm(request.param, tokenizer))
    student = MindReadingStudent(tiny_lm(request.param, tokenizer))
    model = ImplicitModel(emulator, student).eval()
    model.tokenizer = tokenizer
    return model


def encoded_batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``INPUT <sep> ANSWER <eos>`` with answer-only labels, as a training collate makes them."""
    layout = Layout(tokenizer)
    enc = [layout.encode(ex, with_cot=False) for ex in EXAMPLES[1:4]]
    width = max(len(e.ids) for e in enc)
    ids = torch.full((len(enc), width), layout.pad_id)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, e in enumerate(enc):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        mask[i, :len(e.ids)] = 1
        labels[i, e.answer_start:len(e.ids)] = torch.tensor(e.ids[e.answer_start:])
    return ids, mask, torch.tensor([e.s1 for e in enc]), labels


def test_gradients_reach_emulator_and_student(model, tokenizer):
    ids, mask, s1, labels = encoded_batch(tokenizer)
    model.train()
    model(ids, mask, s1, labels).loss.backward()
    for name, module in {"emulator.mlps": model.emulator.mlps, "emulator.rnn": model.emulator.rnn,
                         "emulator.out_proj": model.emulator.out_proj,
                         "emulator.lm": model.emulator.lm.get_input_embeddings(),
                         "student.mlps": model.student.mlps,
                         "student.lm": model.student.lm.get_input_embeddings()}.items():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name


def test_gradient_checkpointing_gives_the_same_gradients(model, tokenizer):
    # The edits run in the blocks' pre-hooks, outside the checkpointed forward: recomputation must not redo them.
    ids, mask, s1, labels = encoded_batch(tokenizer)
    model.train()

    def grads():
        model.zero_grad()
        model(ids, mask, s1, labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    for lm in (model.emulator.lm, model.student.lm):
        lm.activation_checkpointing_enable({"use_reentrant": False})
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_mismatched_parts_are_rejected(tokenizer):
    emulator = ThoughtEmulator(tiny_lm("gpt2", tokenizer))
    with pytest.raises(ValueError, match="hidden_size=32.*hidden_size=16"):
        ImplicitModel(emulator, MindReadingStudent(tiny_lm("gpt2", tokenizer, hidden=16)))
    with pytest.raises(ValueError, match="n_layer=2.*n_layer=3"):
        ImplicitModel(emulator, MindReadingStudent(tiny_lm("gpt2", tokenizer, n_layer=3)))


def test_predictor_batched_equals_batch_of_one(model):
    predictor = ImplicitPredictor(model, max_new_tokens=MAX_NEW)
    inputs = [ex.input for ex in EXAMPLES]
    batched = predictor.predict(inputs)
    alone = [predictor.predict([x])[0] for x in inputs]
    assert batched == alone
    assert all(p.cot == "" for p in batched)
    assert len({p.answer for p in batched}) > 1  # answers depend on the input: the comparison is not vacuous


def test_save_load_round_trip(model, tokenizer, tmp_path):
    inputs = [ex.input for ex in EXAMPLES]
    expected = ImplicitPredictor(model, MAX_NEW).predict(inputs)
    model.save_pretrained(tmp_path, tokenizer)
    assert read_meta(tmp_path)["kind"] == "implicit"
    assert read_meta(tmp_path / "emulator")["kind"] == "emulator"
    assert read_meta(tmp_path / "student")["kind"] == "student"
    loaded = ImplicitModel.from_pretrained(tmp_path).eval()
    assert loaded.tokenizer is not None
    assert ImplicitPredictor(loaded, MAX_NEW).predict(inputs) == expected
    # The evaluation entry point loads the same thing.
    predictor = load_predictor(str(tmp_path), max_new_tokens=MAX_NEW, device="cpu")
    assert isinstance(predictor, ImplicitPredictor)
    assert predictor.predict(inputs) == expected
    # In bfloat16 the emulated states written into the student are bfloat16 too: decoding runs through.
    half = load_predictor(str(tmp_path), max_new_tokens=MAX_NEW, device="cpu", dtype="bfloat16")
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    assert [len(p.answer.split()) > 0 for p in half.predict(inputs)] == [True] * len(inputs)


def test_load_rejects_a_missing_part(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path, tokenizer)
    (tmp_path / "student").rename(tmp_path / "other")
    with pytest.raises(CheckpointError, match="student"):
        ImplicitModel.from_pretrained(tmp_path)


def test_never_sees_a_cot_token(model, tokenizer):
    """Both LMs receive only the left-padded prompts, then (student) its own generated tokens one at a time."""
    calls: dict[str, list[torch.Tensor]] = {"emulator": [], "student": []}

    def recorder(name):
        def hook(module, args):
            calls[name].append(args[0].clone())  # (B, T) token ids entering the embedding
        return hook

    handles = [model.emulator.lm.get_input_embeddings().register_forward_pre_hook(recorder("emulator")),
               model.student.lm.get_input_embeddings().register_forward_pre_hook(recorder("student"))]
    try:
        layout = Layout(tokenizer)
        inputs = [ex.input for ex in EXAMPLES]
        prompts, mask = left_pad([layout.prompt_ids(x) for x in inputs], layout.pad_id)  # (B, T)
        s1 = torch.full((len(inputs),), prompts.shape[1] - 1)  # (B,)
        with torch.no_grad():
            new = model.generate(prompts, mask, s1, layout, MAX_NEW)  # (B, t)
    finally:
        for h in handles:
            h.remove()
    assert len(calls["emulator"]) == 1 and torch.equal(calls["emulator"][0], prompts)
    assert torch.equal(calls["student"][0], prompts)
    decoded = torch.cat(calls["student"][1:], dim=1)  # (B, t - 1): each step feeds the previous new token
    assert torch.equal(decoded, new[:, :decoded.shape[1]])
    assert decoded.shape[1] == new.shape[1] - 1
    cot_only = set(tokenizer.convert_tokens_to_ids(["+", "(", ")"]))
    assert not cot_only & set(prompts.flatten().tolist())
