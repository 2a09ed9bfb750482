"""Thought emulator on tiny random GPT-2 and Llama models."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from icot.data import parse_line
from icot.data.multiplication import make_example
from icot.errors import CheckpointError
from icot.models.checkpoint import MODULES_FILE
from icot.models.emulator import ThoughtEmulator, component_loss, state_loss
from icot.models.student import position_ids_from_mask
from icot.rundir import read_meta
from icot.tokenizer import build_word_tokenizer

H, VOCAB = 16, 40
EOS, PAD = 0, 1  # the word tokenizer's ids of <|endoftext|> and <pad>


def tiny_gpt2(n_layer: int) -> GPT2LMHeadModel:
    config = GPT2Config(n_layer=n_layer, n_embd=H, n_head=2, vocab_size=VOCAB, n_positions=64,
                        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD)
    return GPT2LMHeadModel(config)


def tiny_llama(n_layer: int) -> LlamaForCausalLM:
    config = LlamaConfig(num_hidden_layers=n_layer, hidden_size=H, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=32, vocab_size=VOCAB, max_position_embeddings=64,
                         bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD)
    return LlamaForCausalLM(config)


BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


@pytest.fixture(params=sorted(BUILDERS))
def arch(request) -> str:
    return request.param


def make_emulator(arch: str, n_layer: int = 2, mixture_size: int = 1) -> ThoughtEmulator:
    torch.manual_seed(0)
    return ThoughtEmulator(BUILDERS[arch](n_layer), mixture_size=mixture_size).eval()


def batch(B: int = 2, T: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, VOCAB, (B, T), generator=g)  # (B, T)
    mask = torch.ones_like(input_ids)
    mask[1, :2] = 0  # a left-padded row
    s1 = torch.tensor([4, 6])  # row 0: columns 5.. follow its <sep> (e.g. ANSWER tokens) and must not matter
    return input_ids, mask, s1


def test_output_shapes_without_mixture(arch):
    emulator = make_emulator(arch)
    input_ids, mask, s1 = batch()
    with torch.no_grad():
        out = emulator(input_ids, mask, s1)
    assert out.states.shape == (2, 2, H)
    assert out.component_logits is None
    assert not emulator.editor.armed


def test_mixture_teacher_forcing_and_argmax(arch):
    emulator = make_emulator(arch, mixture_size=3)
    input_ids, mask, s1 = batch()
    components = torch.tensor([[0, 2], [1, 1]])  # (B, L)
    with torch.no_grad():
        forced = emulator(input_ids, mask, s1, components)
        free = emulator(input_ids, mask, s1)
    assert forced.component_logits.shape == (2, 2, 3)
    assert torch.isfinite(component_loss(forced.component_logits, components))
    # Inference picks argmax components; forcing exactly those reproduces it.
    chosen = free.component_logits.argmax(dim=-1)  # (B, L)
    with torch.no_grad():
        replay = emulator(input_ids, mask, s1, chosen)
    torch.testing.assert_close(replay.states, free.states, rtol=0, atol=0)
    with pytest.raises(ValueError, match="components"):
        emulator(input_ids, mask, s1, components[:, :1])


def test_state_loss_by_hand():
    pred = torch.tensor([[[1.0, 2.0], [0.0, -1.0]], [[3.0, 0.0], [1.0, 1.0]]])  # (B=2, L=2, H=2)
    target = torch.tensor([[[0.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, -1.0]]])
    # row 0: (1 + 4 + 0 + 4) / 2 = 4.5; row 1: (4 + 1 + 0 + 4) / 2 = 4.5; mean 4.5
    assert state_loss(pred, target).item() == pytest.approx(4.5)
    target[0] = pred[0]  # row 0: 0, row 1: 4.5 -> mean 2.25
    assert state_loss(pred, target).item() == pytest.approx(2.25)


def test_component_loss_by_hand():
    logits = torch.zeros(1, 2, 4)  # uniform over K=4
    assert component_loss(logits, torch.tensor([[0, 3]])).item() == pytest.approx(torch.log(torch.tensor(4.0)).item())


def test_written_vector_reaches_later_layers(arch, monkeypatch):
    emulator = make_emulator(arch)
    input_ids, mask, s1 = batch()
    seen = {}
    step = emulator._step

    def record(layer, cur, components, rec):
        seen[layer] = cur.clone()  # (B, H) the emulator's own state entering block `layer`
        return step(layer, cur, components, rec)

    monkeypatch.setattr(emulator, "_step", record)
    with torch.no_grad():
        emulator(input_ids, mask, s1)
        hidden = emulator.lm(input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                             output_hidden_states=True).hidden_states  # without any edit
    plain = torch.stack([h[torch.arange(2), s1] for h in hidden[:-1]], dim=1)  # (B, L, H)
    torch.testing.assert_close(seen[0], plain[:, 0])  # nothing was written before block 0 yet
    assert (seen[1] - plain[:, 1]).abs().amax(dim=-1).min() > 1e-4  # block 0 computed on the written vector


def _reference_writes(emulator: ThoughtEmulator, own_states: list[torch.Tensor]) -> list[torch.Tensor]:
    """METHOD.md's recurrence with ``nn.LSTM`` run one layer at a time, from the states read at ``s1``."""
    writes, keys, state = [], [], None
    context = torch.zeros_like(own_states[0])  # (B, H) c_{-1}
    for layer, h in enumerate(own_states):
        m = emulator.mixture.weight.expand(h.shape[0], -1)  # K = 1
        z_hat = emulator.mlps[layer](torch.cat([h, m], dim=-1))
        out, state = emulator.rnn((z_hat + context)[None], state)
        out = out[0]  # (B, H) o_l
        if keys:
            past = torch.stack(keys, dim=1)  # (B, l, H)
            scores = torch.einsum("bjh,bh->bj", past, emulator.query_proj(out))
            context = torch.einsum("bj,bjh->bh", scores.softmax(-1), past)
        keys.append(emulator.key_proj(out))
        writes.append(emulator.out_proj(torch.cat([out, context], dim=-1)))
    return writes


def test_recurrence_equals_nn_lstm_over_layers(arch, monkeypatch):
    emulator = make_emulator(arch, n_layer=4)
    input_ids, mask, s1 = batch()
    own, written = [], []
    step = emulator._step

    def record(layer, cur, components, rec):
        own.append(cur.clone())
        written.append(step(layer, cur, components, rec))
        return written[-1]

    monkeypatch.setattr(emulator, "_step", record)
    with torch.no_grad():
        emulator(input_ids, mask, s1)
        expected = _reference_writes(emulator, own)
    for layer in range(4):
        torch.testing.assert_close(written[layer], expected[layer], rtol=1e-5, atol=1e-6)


def test_ignores_tokens_after_s1(arch):
    emulator = make_emulator(arch)
    input_ids, mask, s1 = batch()
    changed = input_ids.clone()
    changed[0, 5:] = 3  # after row 0's <sep>
    with torch.no_grad():
        torch.testing.assert_close(emulator(changed, mask, s1).states, emulator(input_ids, mask, s1).states)


def test_left_padding_does_not_change_states(arch):
    # GPT-2 has absolute positions: a left-padded row must be numbered from its first real token, as alone.
    emulator = make_emulator(arch)
    input_ids, mask, s1 = batch()
    with torch.no_grad():
        padded = emulator(input_ids, mask, s1).states[1]  # (L, H), row 1 has two pad columns
        alone = emulator(input_ids[1:, 2:], mask[1:, 2:], s1[1:] - 2).states[0]
    torch.testing.assert_close(padded, alone)


def test_gradient_reaches_every_part(arch):
    # Four layers: the context written at layer l is first read by the state of layer l + 1, and the query only
    # matters once there are two keys to choose between (layer 2), so query_proj first reaches ẑ_3.
    emulator = make_emulator(arch, n_layer=4, mixture_size=2).train()
    input_ids, mask, s1 = batch()
    out = emulator(input_ids, mask, s1, components=torch.tensor([[0, 1, 1, 0], [1, 0, 1, 1]]))
    target = torch.randn_like(out.states)
    (state_loss(out.states, target) + component_loss(out.component_logits, torch.zeros(2, 4, dtype=torch.long))
     ).backward()
    parts = {"mlps": emulator.mlps, "rnn": emulator.rnn, "key_proj": emulator.key_proj,
             "query_proj": emulator.query_proj, "out_proj": emulator.out_proj, "mixture": emulator.mixture,
             "lm embedding": emulator.lm.get_input_embeddings()}
    for name, module in parts.items():
        grads = [p.grad for p in module.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), f"{name} got no gradient"


def test_save_load_round_trip(arch, tmp_path):
    emulator = make_emulator(arch, mixture_size=2)
    tokenizer = build_word_tokenizer([parse_line(make_example(12, 34, 2, 2))])
    input_ids, mask, s1 = batch()
    emulator.save_pretrained(tmp_path, tokenizer)
    assert read_meta(tmp_path) == {"kind": "emulator", "n_layer": 2, "hidden_size": H, "mixture_size": 2}
    loaded, _ = ThoughtEmulator.from_pretrained(tmp_path)
    loaded.eval()
    assert loaded.mixture_size == 2
    with torch.no_grad():
        a, b = emulator(input_ids, mask, s1), loaded(input_ids, mask, s1)
    torch.testing.assert_close(a.states, b.states, rtol=0, atol=0)
    torch.testing.assert_close(a.component_logits, b.component_logits, rtol=0, atol=0)


def test_load_errors_name_the_problem(arch, tmp_path):
    emulator = make_emulator(arch)
    tokenizer = build_word_tokenizer([parse_line(make_example(12, 34, 2, 2))])
    emulator.save_pretrained(tmp_path, tokenizer)
    (tmp_path / MODULES_FILE).unlink()
    with pytest.raises(CheckpointError, match=MODULES_FILE):
        ThoughtEmulator.from_pretrained(tmp_path)
    from icot.models.student import MindReadingStudent

    with pytest.raises(CheckpointError, match="'kind' is 'emulator', expected 'student'"):
        MindReadingStudent.from_pretrained(tmp_path)
