"""Tests of icot.probe: running sums, the closed-form ridge probe, and a planted linear signal."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from icot import probe
from icot.cli import main
from icot.data import parse_line, read_examples
from icot.data.multiplication import generate_examples, make_example
from icot.evaluation import ImplicitPredictor, load_predictor
from icot.generation import shifted_positions
from icot.models.emulator import ThoughtEmulator
from icot.models.hooks import find_blocks
from icot.models.implicit import ImplicitModel
from icot.models.student import MindReadingStudent
from icot.probe import answer_states, probe_model, ridge_r2, running_sums
from icot.tokenizer import build_word_tokenizer


def test_running_sums_give_the_answer_digits_and_carries():
    rng = random.Random(0)
    for _ in range(200):
        n, m = rng.randint(1, 5), rng.randint(1, 5)
        a, b = rng.randint(10 ** (n - 1), 10**n - 1), rng.randint(10 ** (m - 1), 10**m - 1)
        sums = running_sums(a, b, n, m)
        answer = parse_line(make_example(a, b, n, m)).answer.split()
        assert [str(s % 10) for s in sums] == answer and sums[-1] < 10
        carry = 0
        for k, s in enumerate(sums):  # ĉ_k = s_k + r_{k-1}
            s_k = sum((a // 10**i % 10) * (b // 10 ** (k - i) % 10) for i in range(n) if 0 <= k - i < m)
            assert s == s_k + carry
            carry = s // 10
    assert running_sums(99, 99, 2, 2) == [81, 170, 98, 9]  # 9801


def test_ridge_r2_reads_a_planted_linear_signal_and_not_noise():
    torch.manual_seed(0)
    x = torch.randn(600, 20, dtype=torch.float64)
    w = torch.randn(20, dtype=torch.float64)
    y = x @ w + 0.01 * torch.randn(600, dtype=torch.float64)
    assert ridge_r2(x[:400], y[:400], x[400:], y[400:], ridge=1.0) > 0.99
    noise = torch.randn(600, dtype=torch.float64)
    assert ridge_r2(x[:400], noise[:400], x[400:], noise[400:], ridge=1.0) < 0.05


def test_answer_states_are_the_states_that_predict_each_answer_digit(trained_nocot, session_config):
    predictor = load_predictor(str(trained_nocot))
    examples = read_examples(session_config.data.valid)[:3]
    items = predictor.layout.encode_all(examples, with_cot=False)
    states = answer_states(predictor, items, digits=4, batch_size=2)  # (N, L+1, K, H)
    assert states.shape == (3, 3, 4, 32)
    it = items[1]
    with torch.no_grad():
        hidden = predictor.model(input_ids=torch.tensor([it.ids]), output_hidden_states=True).hidden_states
    for k in range(4):
        assert torch.allclose(states[1, :, k], torch.stack([h[0, it.answer_start - 1 + k] for h in hidden]),
                              atol=1e-5)
    predictor.position_shift = 5  # a keep_position model's states come from its shifted positions
    shifted = answer_states(predictor, items[1:2], digits=4)
    with torch.no_grad():
        positions = shifted_positions(len(it.ids), torch.tensor([it.s1]), 5)
        moved = predictor.model(input_ids=torch.tensor([it.ids]), position_ids=positions,
                                output_hidden_states=True).hidden_states
    assert torch.allclose(shifted[0, -1, 0], moved[-1][0, it.answer_start - 1], atol=1e-5)
    assert not torch.allclose(shifted[0, -1, 0], states[1, -1, 0])


def test_probe_finds_the_layer_a_running_sum_was_planted_in(trained_nocot, session_config, monkeypatch):
    """States that hold ĉ_k (plus noise) at layer 1 only: the probe reads it there and nowhere else."""
    predictor = load_predictor(str(trained_nocot))
    train, test = read_examples(session_config.data.train)[:300], read_examples(session_config.data.valid)
    generator = torch.Generator().manual_seed(0)

    def planted(predictor, items, digits, batch_size=256):
        sums = probe.targets(train if len(items) == len(train) else test)  # (N, K)
        states = torch.randn(len(items), 3, digits, 8, generator=generator, dtype=torch.float64)
        states[:, 1, :, 0] = sums + 0.05 * states[:, 1, :, 0]  # layer 1, feature 0: the signal, a little noise
        return states

    monkeypatch.setattr(probe, "answer_states", planted)
    result = probe_model(predictor, train, test)
    assert result["layers"] == 3 and result["digits"] == 4 and len(result["r2"]) == 3
    assert all(r > 0.95 for r in result["r2"][1])
    assert all(r < 0.2 for layer in (0, 2) for r in result["r2"][layer])


def test_cli_probe_writes_r2_per_layer_and_digit(trained_nocot, session_config, tmp_path, capsys):
    out = tmp_path / "probe.json"
    assert main(["probe", "--model", str(trained_nocot), "--train", session_config.data.train, "--test",
                 session_config.data.valid, "--train-lines", "200", "--json", str(out),
                 "--plot", str(tmp_path / "probe.png")]) == 0
    result = json.loads(out.read_text())
    assert len(result["r2"]) == 3 and all(len(row) == 4 for row in result["r2"])
    assert all(r <= 1.0 for row in result["r2"] for r in row) and (tmp_path / "probe.png").stat().st_size > 1000
    gsm = tmp_path / "gsm.txt"
    gsm.write_text("How many? 3 + 4||<<3+4=7>> #### 7\n" * 4, encoding="utf-8")
    capsys.readouterr()
    assert main(["probe", "--model", str(trained_nocot), "--train", str(gsm), "--test", str(gsm),
                 "--json", str(out)]) == 2
    assert "multiplication" in capsys.readouterr().err


def test_cli_probe_refuses_what_would_give_wrong_numbers(trained_nocot, session_config, tmp_path, capsys):
    base = ["probe", "--model", str(trained_nocot), "--json", str(tmp_path / "p.json")]
    other_size = tmp_path / "3x2.txt"
    other_size.write_text("\n".join(make_example(100 + i, 10 + i, 3, 2) for i in range(5)) + "\n", encoding="utf-8")
    mixed = tmp_path / "mixed.txt"
    lines = [make_example(10 + i, 10 + i, 2, 2) for i in range(3)] + [make_example(123, 45, 3, 2)]
    mixed.write_text("\n".join(lines) + "\n", encoding="utf-8")
    one = tmp_path / "one.txt"
    one.write_text(make_example(12, 34, 2, 2) + "\n", encoding="utf-8")
    cases = [
        (["--train", session_config.data.train, "--test", str(other_size)], f"{other_size}: the test problems are 3x2"),
        (["--train", str(mixed), "--test", session_config.data.valid], f"{mixed}:4: a 3x2 problem among 2x2 ones"),
        (["--train", str(one), "--test", session_config.data.valid], f"{one}: 1 problem(s)"),
    ]
    for flags, expected in cases:
        capsys.readouterr()
        assert main(base + flags) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"icot: error: {expected}") and len(err.splitlines()) == 1, err
    with pytest.raises(SystemExit):  # a ridge of 0 is singular at layer 0
        main(base + ["--train", session_config.data.train, "--test", session_config.data.valid, "--ridge", "0"])


def test_cot_columns_label_every_digit_of_the_partial_products_and_sums():
    cot = parse_line(make_example(3719, 3349, 4, 4)).cot  # METHOD.md's example
    assert cot.startswith("1 7 4 3 3 + 0 6 7 8 4 1 ( 1 3 2 2 8 1 ) +")
    columns = probe.cot_columns(cot)
    assert columns[:6] == [("P0", 0), ("P0", 1), ("P0", 2), ("P0", 3), ("P0", 4), None]
    assert columns[6:13] == [("P1", c) for c in range(6)] + [None]
    assert columns[13:20] == [("S1", c) for c in range(6)] + [None]
    assert [c for c in columns if c and c[0] == "P3"] == [("P3", c) for c in range(8)]
    assert sum(c is None for c in columns) == len([s for s in cot.split() if s in "+()"])


def _split_examples(n_train: int, n_test: int, digits: tuple[int, int] = (2, 2)):
    test_lines = generate_examples(*digits, n_test, seed=11)
    train_lines = generate_examples(*digits, n_train, seed=12, exclude=[parse_line(x).input for x in test_lines])
    return [parse_line(x) for x in train_lines], [parse_line(x) for x in test_lines]


def test_cot_probe_decodes_planted_cot_digits_in_one_layer_and_chance_elsewhere():
    """Layer 1 holds a random linear code of every CoT symbol at every answer position; layers 0 and 2 noise."""
    train, test = _split_examples(1200, 400, (2, 3))  # 2x3: three partial products and one running sum
    vocab = {s: i for i, s in enumerate(sorted({s for ex in train + test for s in ex.cot.split()}))}
    generator = torch.Generator().manual_seed(0)
    codes = torch.randn(len(train[0].cot.split()), len(vocab), 96, generator=generator)  # (C, V, H)

    def states(examples):
        symbols = torch.tensor([[vocab[s] for s in ex.cot.split()] for ex in examples])  # (N, C)
        signal = codes[torch.arange(symbols.shape[1]), symbols].sum(1)  # (N, H)
        x = torch.randn(len(examples), 3, 5, 96, generator=generator)  # (N, L+1, K, H)
        x[:, 1] = signal[:, None] + 0.1 * x[:, 1]
        return x

    result = probe.cot_probe(states(train), states(test), train, test)
    assert set(result["symbols"]) >= {"P0[0]", "P1[1]", "S1[3]"} and "P1[0]" not in result["symbols"]  # P1[0] is 0
    assert all(train[0].cot.split()[j] not in "+()" for j in result["positions"])
    accuracy, chance = torch.tensor(result["accuracy"]), torch.tensor(result["chance"])  # (L+1, K, J), (J,)
    assert accuracy.shape == (3, 5, len(result["positions"]))
    assert accuracy[1].min() > 0.97
    assert (accuracy[[0, 2]] - chance).abs().mean() < 0.06 and accuracy[[0, 2]].max() < chance.max() + 0.15
    assert 0.05 < chance.min() and chance.max() < 0.6  # a varying digit: chance well below 1
    assert all(v > 0.97 for v in result["column_accuracy"][1])
    assert all(abs(v - c) < 0.12 for v, c in zip(result["column_accuracy"][0], result["column_chance"]))
    # column_accuracy is the mean over the digits of that column.
    j = [i for i, c in enumerate(result["columns"]) if c == 2]
    assert result["column_accuracy"][0][2] == pytest.approx(accuracy[0, 2, j].mean().item())


def test_ridge_classify_reads_a_linear_class_code_and_not_noise():
    generator = torch.Generator().manual_seed(1)
    y = torch.randint(0, 4, (900, 2), generator=generator)  # (N, J): two targets of 4 classes
    code = torch.randn(2, 4, 16, generator=generator)  # (J, V, H)
    x = code[0, y[:, 0]] + code[1, y[:, 1]] + 0.1 * torch.randn(900, 16, generator=generator)  # (N, H)
    noise = torch.randn(900, 16, generator=generator)
    pred = probe.ridge_classify(torch.stack([x[:600], noise[:600]]), y[:600], torch.stack([x[600:], noise[600:]]), 4)
    assert pred.shape == (2, 300, 2)
    accuracy = (pred == y[600:]).double().mean(1)  # (P, J)
    assert accuracy[0].min() > 0.98 and accuracy[1].max() < 0.35


def test_cot_probe_refuses_cots_of_another_layout(tmp_path):
    train, test = _split_examples(20, 5)
    other = [parse_line(make_example(123, 45, 3, 2))] * 2
    x = torch.randn(20, 2, 4, 8)
    with pytest.raises(probe.DataFormatError, match="the test CoTs have"):
        probe.cot_probe(x, torch.randn(2, 2, 4, 8), train, other, test_path="t.txt")
    broken = train[:3] + [parse_line("1 2 * 3 4||1 2 #### 3 6 0 0")]
    with pytest.raises(probe.DataFormatError, match="a CoT of 2 symbols among ones of 8") as info:
        probe.cot_probe(torch.randn(4, 2, 4, 8), x, broken, test, train_path="tr.txt")
    assert str(info.value).startswith("tr.txt:4: ")


def _tiny_implicit(examples) -> ImplicitModel:
    """A random 2-layer, 32-dim GPT-2 emulator + student (a wide init, so that states depend on the input)."""
    tokenizer = build_word_tokenizer(examples)
    ids = {"bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id, "initializer_range": 0.5}

    def lm():
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=64,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids))

    torch.manual_seed(0)
    model = ImplicitModel(ThoughtEmulator(lm()), MindReadingStudent(lm())).eval()
    model.tokenizer = tokenizer
    return model


def _manual_block_inputs(model: ImplicitModel, ids: list[int], s1: int) -> list[torch.Tensor]:
    """One row's student states, read by pre-hooks that run after the student's own edit: L+1 of (T, H)."""
    ids_t, s1_t = torch.tensor([ids]), torch.tensor([s1])
    v = model.student.substitutes(model.emulator(ids_t, None, s1_t).states)  # (1, L, H)
    seen = []
    with torch.no_grad(), model.student.editor.edit(s1_t, lambda l, cur: v[:, l]):
        handles = [block.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0][0]), with_kwargs=True)
                   for block in find_blocks(model.student.lm)]
        final = model.student.lm(input_ids=ids_t, output_hidden_states=True).hidden_states[-1][0]
    for handle in handles:
        handle.remove()
    return [*seen, final]


def test_implicit_states_are_the_students_on_the_emulated_states():
    """The KD model's probed states: the student's block inputs at its answer positions, with the emulator's
    states substituted at <sep> (right-padded rows of two sizes, checked against one row's manual forward)."""
    examples = [parse_line(make_example(a, b, d, d)) for a, b, d in ((12, 34, 2), (907, 305, 3), (56, 78, 2))]
    model = _tiny_implicit(examples)
    predictor = ImplicitPredictor(model)
    items = predictor.layout.encode_all(examples, with_cot=predictor.with_cot)
    assert items[0].answer_start == items[0].s1 + 1  # no marker: digit 0 is predicted at <sep> itself
    states = answer_states(predictor, items, digits=4, batch_size=3)  # (N, L+1, K, H)
    assert states.shape == (3, 3, 4, 32)
    for i, it in enumerate(items):
        manual = _manual_block_inputs(model, it.ids, it.s1)
        expected = torch.stack([h[it.answer_start - 1: it.answer_start + 3] for h in manual])  # (L+1, K, H)
        assert torch.allclose(states[i], expected, atol=1e-5)
    # At <sep> the state entering block l is the vector written there, MLP_l(ẑ_l); not the student's own.
    it = items[1]
    with torch.no_grad():
        v = model.student.substitutes(model.emulator(torch.tensor([it.ids]), None, torch.tensor([it.s1])).states)
        plain = model.student.lm(input_ids=torch.tensor([it.ids]), output_hidden_states=True).hidden_states
    assert torch.allclose(states[1, :2, 0], v[0], atol=1e-5)
    assert not torch.allclose(states[1, 1, 1], plain[1][0, it.s1 + 1], atol=1e-3)  # substitution reaches later tokens
    # The emulator's states matter: other emulator weights, other student states after <sep>.
    with torch.no_grad():
        for p in model.emulator.out_proj.parameters():
            p.add_(1.0)
    moved = answer_states(predictor, items, digits=4)
    assert torch.allclose(moved[:, 0, 1:], states[:, 0, 1:], atol=1e-6)  # embeddings after <sep> do not move
    assert not torch.allclose(moved[:, 2], states[:, 2], atol=1e-3)


def test_cli_probes_an_implicit_model_and_decodes_the_cot(session_config, tmp_path, capsys):
    train = read_examples(session_config.data.train)
    model = _tiny_implicit(train)
    model.save_pretrained(tmp_path / "implicit", model.tokenizer)
    out = tmp_path / "kd.json"
    capsys.readouterr()
    assert main(["probe", "--model", str(tmp_path / "implicit"), "--train", session_config.data.train, "--test",
                 session_config.data.valid, "--train-lines", "200", "--json", str(out),
                 "--plot", str(tmp_path / "kd.png")]) == 0
    result = json.loads(out.read_text())
    assert result["layers"] == 3 and result["digits"] == 4 and result["size"] == "2x2"
    cot = result["cot"]
    assert len(cot["accuracy"]) == 3 and all(len(row) == 4 and len(row[0]) == len(cot["positions"])
                                             for row in cot["accuracy"])
    assert cot["symbols"][:3] == ["P0[0]", "P0[1]", "P0[2]"] and "P1[0]" not in cot["symbols"]
    assert all(0.0 <= a <= 1.0 for row in cot["accuracy"] for k in row for a in k)
    assert "layer 2: CoT" in capsys.readouterr().err
    assert (tmp_path / "kd.png").stat().st_size > 1000
    # Test lines without a CoT: R² only, said so.
    bare = tmp_path / "bare.txt"
    bare.write_text("".join(f"{ex.input}|| #### {ex.answer}\n" for ex in read_examples(session_config.data.valid)),
                    encoding="utf-8")
    assert main(["probe", "--model", str(tmp_path / "implicit"), "--train", session_config.data.train, "--test",
                 str(bare), "--train-lines", "100", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["cot"] is None
    assert f"no CoT probe: {bare} has lines without a CoT" in capsys.readouterr().err
