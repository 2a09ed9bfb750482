"""Tests of icot.devices: the decode device, Accelerate's process state and the mixed precision ``auto`` picks."""

from __future__ import annotations

import pytest
import torch

import icot.devices
from icot.devices import cpu_bf16_speedup, decode_device, process_state, resolve_mixed_precision
from icot.errors import ConfigError


def test_decode_device_resolves_auto_and_refuses_what_is_not_there():
    assert decode_device("auto") == process_state().device
    assert decode_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="eval.device.*not a torch device"):
        decode_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="'cuda:0', which torch cannot use here: "):
            decode_device("cuda:0")
    with pytest.raises(ConfigError, match="'cuda:99', which torch cannot use here: "):
        decode_device("cuda:99")
    with pytest.raises(ConfigError, match="meta tensor holds no values"):
        decode_device("meta")


def test_cpu_bf16_speedup_is_a_measured_ratio():
    speedup = cpu_bf16_speedup(64)
    assert 0 < speedup < float("inf")
    assert cpu_bf16_speedup(64) == speedup  # measured once per process


@pytest.mark.parametrize("speedup, picked, said", [(3.0, "bf16", "3.0x as fast"), (0.02, "no", "50x slower")])
def test_auto_picks_bf16_only_where_the_cpu_runs_it_natively(monkeypatch, speedup, picked, said):
    monkeypatch.setattr(icot.devices, "cpu_bf16_speedup", lambda: speedup)
    precision, note = resolve_mixed_precision("auto", torch.device("cpu"))
    assert precision == picked
    assert note.startswith(f"mixed_precision auto -> {picked}: ") and said in note


def test_explicit_precisions_are_kept_and_bf16_on_an_emulating_cpu_is_warned_about(monkeypatch):
    monkeypatch.setattr(icot.devices, "cpu_bf16_speedup", lambda: 0.02)
    assert resolve_mixed_precision("no", torch.device("cpu")) == ("no", "")
    assert resolve_mixed_precision("fp16", torch.device("cpu")) == ("fp16", "")
    precision, note = resolve_mixed_precision("bf16", torch.device("cpu"))
    assert precision == "bf16" and note.startswith("warning:") and "50x slower" in note
    monkeypatch.setattr(icot.devices, "cpu_bf16_speedup", lambda: 3.0)
    assert resolve_mixed_precision("bf16", torch.device("cpu")) == ("bf16", "")
    assert resolve_mixed_precision("auto", torch.device("meta"))[0] == "no"
