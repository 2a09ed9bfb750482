"""Tests of icot.generation: stopping, left padding, batched greedy decoding and moved positions."""

from __future__ import annotations

import pytest
import torch

from icot.data import Example, read_examples
from icot.evaluation import LMPredictor
from icot.generation import StopAfterEos, greedy_generate, left_pad, shifted_positions
from icot.models.lm import load_lm_dir
from icot.tokenizer import Layout

EOS = 0


def _inputs(config, n: int) -> list[Example]:
    return read_examples(config.data.valid)[:n]


def test_stop_after_eos_is_per_row():
    prompt = torch.tensor([[5, EOS, 6]] * 4)  # the prompt's own <sep> must not count
    generated = torch.tensor([
        [7, 8, 9, 7],  # no eos
        [7, EOS, 9, 7],  # one
        [EOS, 8, EOS, 7],  # two
        [EOS, EOS, EOS, 7],  # three
    ])
    ids = torch.cat([prompt, generated], dim=1)
    scores = torch.zeros(4, 10)
    assert StopAfterEos(EOS, 1, prompt_length=3)(ids, scores).tolist() == [False, True, True, True]
    assert StopAfterEos(EOS, 2, prompt_length=3)(ids, scores).tolist() == [False, False, True, True]
    assert StopAfterEos(EOS, 3, prompt_length=3)(ids, scores).tolist() == [False, False, False, True]
    # Before anything is generated, no row is done.
    assert not StopAfterEos(EOS, 1, prompt_length=3)(prompt, scores).any()


def test_left_pad():
    prompts = [[3, 4, 5], [6], [7, 8]]
    ids, mask = left_pad(prompts, pad_id=1)
    assert ids.tolist() == [[3, 4, 5], [1, 1, 6], [1, 7, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert ids.dtype == mask.dtype == torch.long
    for row, p in zip(ids, prompts):
        assert row[-len(p):].tolist() == p  # every prompt ends at the last column


@pytest.mark.parametrize("n_eos", [1, 2])
def test_greedy_generate_stops_only_after_n_eos(trained_teacher, session_config, n_eos):
    model, tokenizer, _ = load_lm_dir(trained_teacher / "best")
    model.eval()
    layout = Layout(tokenizer)
    budget = 30
    ids, mask = left_pad([layout.prompt_ids(ex.input) for ex in _inputs(session_config, 8)], layout.pad_id)
    with torch.no_grad():
        new = greedy_generate(model, ids, mask, layout, n_eos, budget)
    # Decoding ends when every row has produced n_eos end-of-text tokens, or at the budget.
    every_row_done = all(int((row == layout.eos_id).sum()) >= n_eos for row in new)
    assert every_row_done or new.shape[1] == budget
    # The longest row is the one that finished last: some row ends exactly at its n-th eos.
    if new.shape[1] < budget:
        last = [int(torch.nonzero(row == layout.eos_id)[n_eos - 1]) for row in new]
        assert max(last) == new.shape[1] - 1


def test_decoding_stays_within_the_context(session_config, never_eos):
    from icot.config import ModelConfig
    from icot.models.lm import build_gpt2
    from icot.tokenizer import build_word_tokenizer

    examples = _inputs(session_config, 3)
    tokenizer = build_word_tokenizer(examples)
    torch.manual_seed(0)
    model = build_gpt2(ModelConfig(n_layer=1, n_embd=16, n_head=2, n_positions=12), tokenizer).eval()
    never_eos(model, tokenizer.convert_tokens_to_ids("3"))
    layout = Layout(tokenizer)
    prompt = len(layout.prompt_ids(examples[0].input))
    for with_cot in (True, False):
        preds = LMPredictor(model, layout, with_cot, max_new_tokens=50).predict([ex.input for ex in examples])
        for p in preds:
            text = p.cot if with_cot else p.answer
            assert text.split() == ["3"] * (12 - prompt)  # it wrote until the context was full


def test_shifted_positions_move_from_the_sep_on():
    positions = shifted_positions(6, torch.tensor([2, 1]), torch.tensor([3, 0]))
    assert positions.tolist() == [[0, 1, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5]]


def _manual_greedy(model, prompt: list[int], shift: int, steps: int) -> list[int]:
    """Greedy decoding without generate(): every forward gets explicitly shifted positions."""
    ids = torch.tensor([prompt])
    s1 = torch.tensor([len(prompt) - 1])
    for _ in range(steps):
        positions = shifted_positions(ids.shape[1], s1, shift)
        logits = model(input_ids=ids, position_ids=positions).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    return ids[0, len(prompt):].tolist()


def test_generate_with_moved_positions_equals_a_manual_decode(trained_nocot, session_config):
    """A keep_position model's decoding: generate() with the position hook (left-padded, batched) gives the
    tokens of a plain loop that passes the shifted positions itself, and the shift changes the logits."""
    model, tokenizer, _ = load_lm_dir(trained_nocot / "best")
    model.eval()
    layout = Layout(tokenizer)
    # Prompts of different lengths, so that left padding puts each row's <sep> elsewhere in its numbering.
    prompts = [layout.prompt_ids(ex.input) for ex in _inputs(session_config, 3)]
    prompts[1] = prompts[1][2:]
    shift, steps = 7, 5
    ids, mask = left_pad(prompts, layout.pad_id)
    with torch.no_grad():
        moved = greedy_generate(model, ids, mask, layout, n_eos=99, max_new_tokens=steps, position_shift=shift)
        for row, prompt in zip(moved.tolist(), prompts):
            assert row == _manual_greedy(model, prompt, shift, steps)
        ids1 = torch.tensor([prompts[0]])
        plain = model(input_ids=ids1).logits
        shifted = model(input_ids=ids1, position_ids=shifted_positions(ids1.shape[1], torch.tensor([ids1.shape[1] - 1]),
                                                                      shift)).logits
    assert torch.allclose(plain[0, :-1], shifted[0, :-1])  # before <sep>: untouched
    assert not torch.allclose(plain[0, -1], shifted[0, -1])
    assert not model._forward_pre_hooks  # the hook is gone after decoding
