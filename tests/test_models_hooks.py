"""Hidden-state hooks on tiny random GPT-2 and Llama models (the two block call conventions we must support)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

from icot.models.hooks import HiddenStateEditor, find_blocks, read_states

VOCAB = 50
L = 2
H = 32


def tiny_gpt2() -> GPT2LMHeadModel:
    # Token ids inside the tiny vocabulary, so transformers does not warn about the default 50256.
    config = GPT2Config(n_layer=L, n_embd=H, n_head=2, vocab_size=VOCAB, n_positions=64,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(config)


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(num_hidden_layers=L, hidden_size=H, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=64, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config)


BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def hook_count(model: nn.Module) -> int:
    """Forward pre-hooks registered on the model's decoder blocks."""
    return sum(len(block._forward_pre_hooks) for block in find_blocks(model))


@pytest.fixture(params=sorted(BUILDERS))
def model(request):
    torch.manual_seed(0)
    return BUILDERS[request.param]().eval()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1, VOCAB, (2, 8), generator=g)  # (B, T)
    attention_mask = torch.ones_like(input_ids)
    return input_ids, attention_mask


def test_read_states_equals_output_hidden_states(model, batch):
    input_ids, attention_mask = batch
    attention_mask[1, :2] = 0  # a padded row: the mask must reach the model
    positions = torch.tensor([1, 5])
    with torch.no_grad():
        hidden = model(input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
        states = read_states(model, input_ids, attention_mask, positions)  # (B, L, H)
    assert states.shape == (2, L, H)
    for layer in range(L):
        expected = hidden[layer][torch.arange(2), positions]  # (B, H)
        torch.testing.assert_close(states[:, layer], expected, rtol=0, atol=0)
    # The temporary editor of read_states(model, ...) is gone.
    assert hook_count(model) == 0


def test_read_states_with_editor(model, batch):
    input_ids, attention_mask = batch
    positions = torch.tensor([0, 7])
    with HiddenStateEditor(model) as editor, torch.no_grad():
        states = read_states(editor, input_ids, attention_mask, positions)
        assert not editor.armed
        hidden = model(input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
    for layer in range(L):
        torch.testing.assert_close(states[:, layer], hidden[layer][torch.arange(2), positions], rtol=0, atol=0)


def test_writing_current_value_keeps_logits(model, batch):
    input_ids, attention_mask = batch
    with torch.no_grad():
        base = model(input_ids, attention_mask=attention_mask).logits
        editor = HiddenStateEditor(model)
        with editor.edit(torch.tensor([3, 6]), lambda layer, cur: cur.clone()):
            edited = model(input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(edited, base)


@pytest.mark.parametrize("edit_layer", range(L))
def test_write_changes_only_later_positions(model, batch, edit_layer):
    input_ids, attention_mask = batch
    positions = torch.tensor([2, 5])
    v = 3.0 * torch.randn(2, H, generator=torch.Generator().manual_seed(2))  # (B, H)
    calls = []

    def fn(layer, cur):
        calls.append(layer)
        return v if layer == edit_layer else None

    with torch.no_grad():
        base = model(input_ids, attention_mask=attention_mask).logits  # (B, T, V)
        editor = HiddenStateEditor(model)
        with editor.edit(positions, fn):
            edited = model(input_ids, attention_mask=attention_mask).logits
    assert calls == list(range(L))
    for b, p in enumerate(positions.tolist()):
        assert torch.equal(edited[b, :p], base[b, :p]), "a position before the edit changed"
        assert not torch.allclose(edited[b, p], base[b, p]), "the edited position did not change"


def test_gradients_reach_written_vector_and_model(model, batch):
    input_ids, attention_mask = batch
    v = nn.Parameter(torch.randn(2, H))
    editor = HiddenStateEditor(model)
    with editor.edit(torch.tensor([4, 1]), lambda layer, cur: v if layer == 1 else None):
        model(input_ids, attention_mask=attention_mask).logits.pow(2).mean().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0 and torch.isfinite(v.grad).all()
    # h itself stays in the graph (torch.where, not an in-place write): the embeddings get gradients too.
    embeddings = model.get_input_embeddings().weight
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0


def test_dtype_and_cur_gradient(model, batch):
    input_ids, attention_mask = batch
    model = model.double()
    scale = nn.Parameter(torch.tensor(2.0))  # float32 on purpose: the write is cast to the block's dtype
    editor = HiddenStateEditor(model)
    with editor.edit(torch.tensor([0, 3]), lambda layer, cur: cur.float() * scale):
        logits = model(input_ids, attention_mask=attention_mask).logits
    assert logits.dtype == torch.float64
    logits.sum().backward()
    assert scale.grad is not None and scale.grad != 0


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_same_gradients(model, batch, use_reentrant):
    input_ids, attention_mask = batch
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout"):
        if hasattr(model.config, name):  # Llama and GPT-2 attention read the rate from the config
            setattr(model.config, name, 0.0)
    model.train()
    # Counts the runs of the blocks' insides, to show that checkpointing really recomputes them.
    inner_runs = []
    for block in find_blocks(model):
        first_child = next(block.children())
        first_child.register_forward_pre_hook(lambda *a: inner_runs.append(1))
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
        inner_runs.clear()
        v = nn.Parameter(torch.ones(2, H))
        calls = []

        def fn(layer, cur):
            calls.append(layer)
            return cur + v

        editor = HiddenStateEditor(model)
        with editor.edit(torch.tensor([2, 6]), fn, once=True):
            model(input_ids, attention_mask=attention_mask, use_cache=False).logits.sum().backward()
        editor.close()
        assert len(inner_runs) == (2 * L if checkpointing else L)
        # The pre-hooks sit outside the checkpointed forward: no second call during recomputation, so a
        # once-edit that disarmed after the forward pass does not make the recomputation differ.
        assert calls == list(range(L))
        grads.append(v.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def _generate(model, input_ids, attention_mask):
    return model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=3, do_sample=False,
                          pad_token_id=0)


def test_once_edits_only_the_prefill_of_generate(model, batch):
    input_ids, attention_mask = batch
    positions = torch.tensor([2, 6])
    vs = 3.0 * torch.randn(L, 2, H, generator=torch.Generator().manual_seed(3))  # (L, B, H)
    editor = HiddenStateEditor(model)

    shapes = []

    def fn(layer, cur):
        shapes.append(cur.shape)
        return vs[layer]

    assert hook_count(model) == 0  # an idle editor costs the model nothing
    with editor.edit(positions, fn, once=True):
        assert hook_count(model) == L
        generated = _generate(model, input_ids, attention_mask)
        assert not editor.armed  # disarmed by the prefill, still inside the context
        assert hook_count(model) == 0  # and its hooks are gone: the decoding steps run the plain model
    assert len(shapes) == L  # one call per block: the prefill only, never the (B, 1, H) decoding steps

    # Reference without a cache: greedy decoding where every full forward gets the same edit at the same positions,
    # which is what the cached decoding steps see through the edited prefill's keys and values.
    seq = input_ids
    with torch.no_grad():
        for _ in range(3):
            mask = torch.ones_like(seq)
            with editor.edit(positions, lambda layer, cur: vs[layer]):
                logits = model(seq, attention_mask=mask, use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, seq)

    # An identity edit with once=True changes nothing.
    with editor.edit(positions, lambda layer, cur: cur, once=True):
        identity = _generate(model, input_ids, attention_mask)
    editor.close()
    assert torch.equal(identity, _generate(model, input_ids, attention_mask))


def test_editor_idle_after_context(model, batch):
    input_ids, attention_mask = batch
    with torch.no_grad():
        plain = model(input_ids, attention_mask=attention_mask).logits
        editor = HiddenStateEditor(model)
        with editor.edit(torch.tensor([1, 1]), lambda layer, cur: torch.zeros_like(cur)):
            pass
        with editor.edit(torch.tensor([1, 1]), lambda layer, cur: torch.zeros_like(cur), once=True):
            pass  # armed but never used: exiting still disarms
        assert not editor.armed
        assert hook_count(model) == 0
        idle = model(input_ids, attention_mask=attention_mask).logits
    assert torch.equal(idle, plain)
    editor.close()
    assert hook_count(model) == 0
    with pytest.raises(RuntimeError, match="closed"):
        with editor.edit(torch.tensor([1, 1]), lambda layer, cur: cur):
            pass


def test_position_outside_sequence_raises(model, batch):
    input_ids, attention_mask = batch
    editor = HiddenStateEditor(model)
    with pytest.raises(ValueError, match="outside the sequence of length 8"):
        with torch.no_grad(), editor.edit(torch.tensor([1, 8]), lambda layer, cur: None):
            model(input_ids, attention_mask=attention_mask)
    # Without once=True, the cached decoding steps of generate (T == 1) cannot hold position 5.
    with pytest.raises(ValueError, match="once=True"):
        with editor.edit(torch.tensor([5, 5]), lambda layer, cur: None):
            _generate(model, input_ids, attention_mask)
    assert not editor.armed


def test_edit_argument_errors(model):
    editor = HiddenStateEditor(model)
    with pytest.raises(ValueError, match=">= 0"):
        with editor.edit(torch.tensor([-1, 2]), lambda layer, cur: None):
            pass
    with pytest.raises(ValueError, match="integer"):
        with editor.edit(torch.tensor([1.0, 2.0]), lambda layer, cur: None):
            pass
    with editor.edit(torch.tensor([1, 2]), lambda layer, cur: None):
        with pytest.raises(RuntimeError, match="already armed"):
            with editor.edit(torch.tensor([1, 2]), lambda layer, cur: None):
                pass
    with pytest.raises(ValueError, match="expected"):
        with torch.no_grad(), editor.edit(torch.tensor([1, 2]), lambda layer, cur: cur[:, :4]):
            model(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="batch of 3"):
        with torch.no_grad(), editor.edit(torch.tensor([1, 2]), lambda layer, cur: None):
            model(torch.ones(3, 4, dtype=torch.long))
    editor.close()
    with pytest.raises(RuntimeError, match="closed"):
        with editor.edit(torch.tensor([1, 2]), lambda layer, cur: None):
            pass


def test_find_blocks_known_architectures():
    torch.manual_seed(0)
    gpt2 = tiny_gpt2()
    assert find_blocks(gpt2) is gpt2.transformer.h
    assert find_blocks(gpt2.transformer) is gpt2.transformer.h
    assert isinstance(gpt2.transformer, GPT2Model)
    llama = tiny_llama()
    assert find_blocks(llama) is llama.model.layers
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                            intermediate_size=64, vocab_size=VOCAB))
    assert find_blocks(neox) is neox.gpt_neox.layers
    opt = OPTForCausalLM(OPTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, ffn_dim=64,
                                   word_embed_proj_dim=32, vocab_size=VOCAB, max_position_embeddings=64))
    assert find_blocks(opt) is opt.model.decoder.layers


class _KwargBlock(nn.Module):
    """A block called with ``hidden_states=`` as a keyword, as some architectures do."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, hidden_states):
        return hidden_states + self.proj(hidden_states)


class _OddModel(nn.Module):
    """Blocks under an unknown attribute name: found through config.num_hidden_layers."""

    def __init__(self, n_layers=3):
        super().__init__()
        self.config = type("Config", (), {"num_hidden_layers": n_layers})()
        self.stack = nn.ModuleList(_KwargBlock() for _ in range(n_layers))
        self.other = nn.ModuleList([nn.Linear(4, 4)])

    def forward(self, x):
        for block in self.stack:
            x = block(hidden_states=x)
        return x


def test_find_blocks_fallback_and_kwarg_hidden_states():
    torch.manual_seed(0)
    model = _OddModel()
    assert find_blocks(model) is model.stack
    x = torch.randn(2, 5, 4)  # (B, T, H)
    seen = []
    editor = HiddenStateEditor(model)
    with torch.no_grad(), editor.edit(torch.tensor([0, 3]), lambda layer, cur: seen.append(layer) or cur + 1):
        y = model(x)
    assert seen == [0, 1, 2]
    assert torch.equal(y[0, 1:], model(x)[0, 1:])  # blocks act per position: only the edited ones differ
    assert not torch.equal(y[0, 0], model(x)[0, 0])


def test_find_blocks_error_names_the_class():
    with pytest.raises(ValueError, match="Sequential"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_output_hidden_states_under_an_edit(model, batch):
    """Pins the transformers 5 behaviour documented in hooks.py: entry 0 is edited, later entries are not."""
    input_ids, attention_mask = batch
    positions = torch.tensor([2, 4])
    rows = torch.arange(2)
    ones = torch.ones(2, H)
    editor = HiddenStateEditor(model)
    with torch.no_grad(), editor.edit(positions, lambda layer, cur: ones):
        hidden = model(input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
    assert torch.equal(hidden[0][rows, positions], ones)
    assert not torch.equal(hidden[1][rows, positions], ones)
