"""Teacher-state positions, extraction and separator finding (METHOD.md, ICoT-KD step 1)."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from icot.models.hooks import read_states
from icot.models.teacher_states import (
    SUBSETS,
    extract_teacher_states,
    find_separators,
    teacher_positions,
)

S1 = torch.tensor([3, 5])
S2 = torch.tensor([10, 6])  # uneven s2 - s1: 7 and 1


def dynamic_t(s1: int, s2: int, n_layers: int, layer: int) -> int:
    """The METHOD.md formula in exact arithmetic; Python's round of a Fraction is half to even."""
    if n_layers == 1:
        return s1
    return min(round(s1 + Fraction(layer * (s2 - s1), n_layers - 1)), s2)


def expected(subset: str, delta, s1: int, s2: int, n_layers: int) -> tuple[list[int], list[int]]:
    def t(layer):
        if delta == "dynamic":
            return dynamic_t(s1, s2, n_layers, layer)
        return min(s1 + layer * delta, s2)

    rows = range(n_layers)
    return {
        "diagonal": ([layer for layer in rows], [t(layer) for layer in rows]),
        "first_column": ([layer for layer in rows], [s1] * n_layers),
        "last_column": ([layer for layer in rows], [s2] * n_layers),
        "top_row": ([n_layers - 1] * n_layers, [t(layer) for layer in rows]),
        "bottom_row": ([0] * n_layers, [t(layer) for layer in rows]),
    }[subset]


@pytest.mark.parametrize("n_layers", [1, 2, 4, 6])
@pytest.mark.parametrize("subset", SUBSETS)
@pytest.mark.parametrize("delta", ["dynamic", 2])
def test_teacher_positions_formula(subset, n_layers, delta):
    layers, positions = teacher_positions(S1, S2, n_layers, subset, delta)
    assert layers.dtype == positions.dtype == torch.long
    assert layers.shape == (n_layers,) and positions.shape == (2, n_layers)
    for b in range(2):
        exp_layers, exp_positions = expected(subset, delta, int(S1[b]), int(S2[b]), n_layers)
        assert layers.tolist() == exp_layers
        assert positions[b].tolist() == exp_positions


def test_dynamic_diagonal_values():
    # s1=3, s2=10, L=4: 3 + l * 7/3 = 3, 5.33, 7.67, 10; s1=5, s2=6: 5, 5.33, 5.67, 6.
    _, positions = teacher_positions(S1, S2, 4)
    assert positions.tolist() == [[3, 5, 8, 10], [5, 5, 6, 6]]
    # L=6: 3 + l * 1.4 = 3, 4.4, 5.8, 7.2, 8.6, 10; 5 + l * 0.2 = 5, 5.2, 5.4, 5.6, 5.8, 6.
    _, positions = teacher_positions(S1, S2, 6)
    assert positions.tolist() == [[3, 4, 6, 7, 9, 10], [5, 5, 5, 6, 6, 6]]


def test_dynamic_ties_round_half_to_even():
    # s2 - s1 = 3, L = 3: t_1 = s1 + 1.5, a tie; 3.5 -> 4 and 4.5 -> 4, as torch.round and Python's round do.
    s1, s2 = torch.tensor([2, 3]), torch.tensor([5, 6])
    _, positions = teacher_positions(s1, s2, 3)
    assert positions[:, 1].tolist() == [4, 4]
    floats = torch.round(s1[:, None].double() + torch.arange(3).double() * (s2 - s1)[:, None].double() / 2)
    assert torch.equal(positions, floats.long())


def test_integer_delta_clipped_at_s2():
    _, positions = teacher_positions(S1, S2, 6, delta=2)
    assert positions.tolist() == [[3, 5, 7, 9, 10, 10], [5, 6, 6, 6, 6, 6]]
    _, positions = teacher_positions(S1, S2, 4, delta="0")  # a digit string, as a config may give
    assert positions.tolist() == [[3, 3, 3, 3], [5, 5, 5, 5]]


def test_last_column_is_s2_not_s1():
    _, last = teacher_positions(S1, S2, 4, "last_column")
    _, first = teacher_positions(S1, S2, 4, "first_column")
    assert (last == S2[:, None]).all() and (first == S1[:, None]).all()
    assert not torch.equal(last, first)


def test_teacher_positions_validation():
    with pytest.raises(ValueError, match="diagonal, first_column, last_column, top_row, bottom_row"):
        teacher_positions(S1, S2, 4, "middle")
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        teacher_positions(torch.tensor([3, 6]), torch.tensor([10, 6]), 4)
    for bad in ("fast", -1, 1.5, True):
        with pytest.raises(ValueError, match="delta"):
            teacher_positions(S1, S2, 4, delta=bad)
    with pytest.raises(ValueError, match="n_layers"):
        teacher_positions(S1, S2, 0)
    with pytest.raises(ValueError, match="shape"):
        teacher_positions(S1, torch.tensor([10]), 4)


@pytest.mark.parametrize("n_layers", [4, 6])
@pytest.mark.parametrize("subset", SUBSETS)
def test_extract_teacher_states_equals_hand_loop(subset, n_layers):
    g = torch.Generator().manual_seed(0)
    B, T, H = 2, 12, 16
    hidden_states = tuple(torch.randn(B, T, H, generator=g) for _ in range(n_layers + 1))
    z = extract_teacher_states(hidden_states, S1, S2, subset, "dynamic")
    assert z.shape == (B, n_layers, H)
    norm = nn.LayerNorm(H, elementwise_affine=False)
    for b in range(B):
        exp_layers, exp_positions = expected(subset, "dynamic", int(S1[b]), int(S2[b]), n_layers)
        for layer in range(n_layers):
            want = norm(hidden_states[exp_layers[layer]][b, exp_positions[layer]])
            torch.testing.assert_close(z[b, layer], want)
    torch.testing.assert_close(z.mean(-1), torch.zeros(B, n_layers), atol=1e-5, rtol=0)


def test_extract_teacher_states_errors():
    hidden_states = tuple(torch.randn(2, 8, 4) for _ in range(5))
    with pytest.raises(ValueError, match="outside the sequence of length 8"):
        extract_teacher_states(hidden_states, S1, S2)  # s2 = 10 >= T = 8
    with pytest.raises(ValueError, match="L\\+1"):
        extract_teacher_states(hidden_states[:1], S1, S2)
    with pytest.raises(ValueError, match="hidden_states\\[1\\] is None"):
        extract_teacher_states((hidden_states[0], None, *hidden_states[2:]), torch.tensor([1, 2]), torch.tensor([5, 6]))


def tiny_gpt2():
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=64,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0))


def tiny_llama():
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=64, vocab_size=50,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0))


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_extract_from_model_matches_hook_reads(build):
    """The two ways to read a teacher agree: output_hidden_states + gather, and the block pre-hooks."""
    torch.manual_seed(0)
    model = build().eval()
    sep = 0  # also the pad token, as with GPT-2's end-of-text
    input_ids = torch.tensor([
        [7, 8, 9, sep, 11, 12, 13, 14, sep, 21, sep],
        [sep, sep, 7, 8, 9, 10, sep, 11, sep, 22, sep],  # left-padded with the separator itself
    ])
    attention_mask = torch.tensor([[1] * 11, [0, 0] + [1] * 9])
    s1, s2 = find_separators(input_ids, attention_mask, sep)
    assert s1.tolist() == [3, 6] and s2.tolist() == [8, 8]
    with torch.no_grad():
        hidden = model(input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
        z = extract_teacher_states(hidden, s1, s2)  # (B, L, H)
        layers, positions = teacher_positions(s1, s2, 2)
        for layer in range(2):
            read = read_states(model, input_ids, attention_mask, positions[:, layer])  # (B, L, H)
            torch.testing.assert_close(z[:, layer], nn.functional.layer_norm(read[:, layer], (32,)))


def test_find_separators_left_padding_with_pad_equal_sep():
    sep = 0
    input_ids = torch.tensor([
        [sep, sep, sep, 5, 6, sep, 7, sep, 8, sep],  # three pad tokens that are also the separator
        [4, 5, sep, 6, 7, 8, sep, 9, sep, sep],  # no padding; later separators (eos) are ignored
    ])
    attention_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 10])
    s1, s2 = find_separators(input_ids, attention_mask, sep)
    assert s1.tolist() == [5, 2] and s2.tolist() == [7, 6]
    assert s1.dtype == s2.dtype == torch.long
    # Without the mask the padding would be taken for separators.
    s1_nomask, _ = find_separators(input_ids, None, sep)
    assert s1_nomask.tolist() == [0, 2]


def test_find_separators_missing_raises():
    sep = 0
    input_ids = torch.tensor([[1, sep, 2, sep], [sep, sep, 3, sep]])
    attention_mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])  # row 1 has one attended separator
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        find_separators(input_ids, attention_mask, sep)
