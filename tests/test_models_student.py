"""Mind-reading student on tiny random GPT-2 and Llama models."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from icot.data import parse_line
from icot.data.multiplication import make_example
from icot.errors import CheckpointError
from icot.generation import left_pad
from icot.models.checkpoint import MODULES_FILE
from icot.models.student import MindReadingStudent
from icot.rundir import META_FILE, read_meta, write_meta
from icot.tokenizer import Layout, build_word_tokenizer

L, H, VOCAB = 2, 32, 40
EOS, PAD = 0, 1  # the word tokenizer's ids of <|endoftext|> and <pad>
INIT = 0.5  # a large init spread: with the default 0.02 a tiny random GPT-2 repeats one token whatever it reads


def tiny_gpt2(vocab: int = VOCAB) -> GPT2LMHeadModel:
    config = GPT2Config(n_layer=L, n_embd=H, n_head=2, vocab_size=vocab, n_positions=64,
                        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD, initializer_range=INIT)
    return GPT2LMHeadModel(config)


def tiny_llama(vocab: int = VOCAB) -> LlamaForCausalLM:
    config = LlamaConfig(num_hidden_layers=L, hidden_size=H, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=64, vocab_size=vocab, max_position_embeddings=64,
                         bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD, initializer_range=INIT)
    return LlamaForCausalLM(config)


BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


@pytest.fixture(params=sorted(BUILDERS))
def student(request) -> MindReadingStudent:
    torch.manual_seed(0)
    return MindReadingStudent(BUILDERS[request.param]()).eval()


@pytest.fixture(scope="module")
def tokenizer():
    examples = [parse_line(make_example(a, b, 2, 2)) for a, b in ((12, 34), (56, 78), (90, 11))]
    return build_word_tokenizer(examples)


def random_batch(B: int = 2, T: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (B, T), generator=g)  # (B, T)
    z = torch.randn(B, L, H, generator=g)  # (B, L, H)
    return input_ids, torch.ones_like(input_ids), z


def test_substitution_changes_only_positions_from_s1(student):
    input_ids, mask, z = random_batch()
    s1 = torch.tensor([3, 5])
    with torch.no_grad():
        edited = student(input_ids, mask, s1, z).logits  # (B, T, V)
        plain = student.lm(input_ids, attention_mask=mask).logits
    for b, s in enumerate(s1.tolist()):
        torch.testing.assert_close(edited[b, :s], plain[b, :s])
        # Every later position attends to the substituted state.
        assert (edited[b, s:] - plain[b, s:]).abs().amax(dim=-1).min() > 1e-6
    assert not student.editor.armed


def test_left_padding_does_not_change_logits(student):
    input_ids, mask, z = random_batch()
    mask[1, :3] = 0  # row 1 left-padded by three columns
    s1 = torch.tensor([3, 5])
    with torch.no_grad():
        padded = student(input_ids, mask, s1, z).logits[1, 3:]  # (T - 3, V)
        alone = student(input_ids[1:, 3:], mask[1:, 3:], s1[1:] - 3, z[1:]).logits[0]
    torch.testing.assert_close(padded, alone)


def test_backward_reaches_mlps_and_lm(student):
    input_ids, mask, z = random_batch()
    s1 = torch.tensor([3, 5])
    labels = input_ids.clone()
    labels[:, :6] = -100  # answer-only loss, as the caller masks it
    student.train()
    out = student(input_ids, mask, s1, z, labels=labels)
    out.loss.backward()
    for l, mlp in enumerate(student.mlps):
        assert mlp[0].weight.grad is not None and mlp[0].weight.grad.abs().sum() > 0, f"MLP {l} got no gradient"
    assert student.lm.get_input_embeddings().weight.grad.abs().sum() > 0


def test_save_load_round_trip(student, tokenizer, tmp_path):
    input_ids, mask, z = random_batch()
    s1 = torch.tensor([3, 5])
    student.save_pretrained(tmp_path, tokenizer, meta={"layout": "nocot"})
    loaded, tok = MindReadingStudent.from_pretrained(tmp_path)
    loaded.eval()
    assert len(tok) == len(tokenizer)
    meta = read_meta(tmp_path)
    assert meta == {"kind": "student", "n_layer": L, "hidden_size": H, "layout": "nocot"}
    assert (tmp_path / MODULES_FILE).is_file() and (tmp_path / "model.safetensors").is_file()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids, mask, s1, z).logits, student(input_ids, mask, s1, z).logits,
                                   rtol=0, atol=0)


def test_load_rejects_wrong_mlp_shape(student, tokenizer, tmp_path):
    student.save_pretrained(tmp_path, tokenizer)
    file = tmp_path / MODULES_FILE
    tensors = load_file(str(file))
    tensors["mlps.1.0.weight"] = torch.zeros(4 * H, H + 1)  # an MLP of another width
    save_file(tensors, str(file))
    with pytest.raises(CheckpointError, match=rf"{MODULES_FILE}.*mlps\.1\.0\.weight"):
        MindReadingStudent.from_pretrained(tmp_path)


def test_load_rejects_meta_that_does_not_fit(student, tokenizer, tmp_path):
    student.save_pretrained(tmp_path, tokenizer)
    write_meta(tmp_path, {**read_meta(tmp_path), "n_layer": L + 1})
    with pytest.raises(CheckpointError, match=rf"{META_FILE}.*n_layer"):
        MindReadingStudent.from_pretrained(tmp_path)
    write_meta(tmp_path, {**read_meta(tmp_path), "kind": "emulator"})
    with pytest.raises(CheckpointError, match="kind"):
        MindReadingStudent.from_pretrained(tmp_path)


def test_generate_batched_equals_batch_of_one(student, tokenizer):
    layout = Layout(tokenizer)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, len(tokenizer), (n,), generator=g).tolist() + [layout.sep_id] for n in (5, 2, 8)]
    z = torch.randn(3, L, H, generator=g)  # (B, L, H)
    ids, mask = left_pad(prompts, layout.pad_id)
    s1 = torch.full((3,), ids.shape[1] - 1)
    with torch.no_grad():
        batched = student.generate(ids, mask, s1, z, layout, max_new_tokens=6)
        for b, prompt in enumerate(prompts):
            one_ids, one_mask = left_pad([prompt], layout.pad_id)
            alone = student.generate(one_ids, one_mask, torch.tensor([len(prompt) - 1]), z[b:b + 1], layout, 6)[0]
            assert batched[b, :len(alone)].tolist() == alone.tolist()
    assert len({tuple(row) for row in batched.tolist()}) == 3  # rows differ: the comparison is not vacuous
    assert not student.editor.armed


def test_generate_edits_the_prefill(student, tokenizer):
    layout = Layout(tokenizer)
    input_ids, mask, z = random_batch(T=6)
    input_ids[:, -1] = layout.sep_id
    s1 = torch.full((2,), 5)
    with torch.no_grad():
        first = student.generate(input_ids, mask, s1, z, layout, max_new_tokens=1)[:, 0]  # (B,)
        expected = student(input_ids, mask, s1, z).logits[:, -1].argmax(-1)  # (B,)
    assert first.tolist() == expected.tolist()
