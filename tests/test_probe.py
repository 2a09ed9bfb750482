"""Tests of icot.probe: running sums, the closed-form ridge probe, and a planted linear signal."""

from __future__ import annotations

import json
import random

import pytest
import torch

from icot import probe
from icot.cli import main
from icot.data import parse_line, read_examples
from icot.data.multiplication import make_example
from icot.evaluation import load_predictor
from icot.generation import shifted_positions
from icot.probe import answer_states, probe_model, ridge_r2, running_sums


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
