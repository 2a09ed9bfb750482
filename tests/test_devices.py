"""Tests of icot.devices: the decode device, Accelerate's process state and the mixed precision ``auto`` picks."""

from __future__ import annotations

import pytest
import torch

import icot.devices
from icot.devices import cpu_bf16_flags, cpu_bf16_speedup, decode_device, process_state, resolve_mixed_precision
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


def test_cpu_bf16_speedup_is_a_measured_ratio_that_leaves_the_global_seed_alone():
    torch.manual_seed(7)
    want = torch.rand(3)
    torch.manual_seed(7)
    assert 0 < cpu_bf16_speedup(64) < float("inf")
    assert torch.equal(torch.rand(3), want)


@pytest.mark.parametrize("text, native", [
    ("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16\n", True),  # Zen 4
    ("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n", False),  # the AVX2-only EPYC
    ("processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n", True),  # Sapphire Rapids
    ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),  # Graviton 3
    ("processor\t: 0\nFeatures\t: fp asimd\n", False),
    ("processor\t: 0\n", None),  # neither field: nothing to decide from
])
def test_cpu_bf16_flags_read_cpuinfo(tmp_path, text, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text, encoding="utf-8")
    assert cpu_bf16_flags(cpuinfo) is native
    assert cpu_bf16_flags(tmp_path / "missing") is None


@pytest.mark.parametrize("native, picked", [(True, "bf16"), (False, "no")])
def test_auto_picks_bf16_only_where_the_cpu_runs_it_natively(monkeypatch, native, picked):
    monkeypatch.setattr(icot.devices, "cpu_runs_bf16_natively", lambda: (native, "the reason"))
    assert resolve_mixed_precision("auto", torch.device("cpu")) == (picked, f"mixed_precision auto -> {picked}: "
                                                                            "the reason")


def test_without_cpu_flags_the_measured_speedup_decides_with_a_margin(monkeypatch):
    monkeypatch.setattr(icot.devices, "cpu_bf16_flags", lambda: None)
    for speedup, native in ((4.0, True), (1.2, False), (0.01, False)):
        icot.devices.cpu_runs_bf16_natively.cache_clear()
        monkeypatch.setattr(icot.devices, "cpu_bf16_speedup", lambda: speedup)
        assert icot.devices.cpu_runs_bf16_natively()[0] is native
    icot.devices.cpu_runs_bf16_natively.cache_clear()


def test_explicit_precisions_are_kept_and_bf16_on_an_emulating_cpu_is_warned_about(monkeypatch):
    monkeypatch.setattr(icot.devices, "cpu_runs_bf16_natively", lambda: (False, "no bf16 here"))
    assert resolve_mixed_precision("no", torch.device("cpu")) == ("no", "")
    assert resolve_mixed_precision("fp16", torch.device("cpu")) == ("fp16", "")
    precision, note = resolve_mixed_precision("bf16", torch.device("cpu"))
    assert precision == "bf16" and note.startswith("warning:") and "no bf16 here" in note
    monkeypatch.setattr(icot.devices, "cpu_runs_bf16_natively", lambda: (True, "native"))
    assert resolve_mixed_precision("bf16", torch.device("cpu")) == ("bf16", "")
    assert resolve_mixed_precision("auto", torch.device("meta"))[0] == "no"
