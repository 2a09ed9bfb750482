"""Tests of icot.devices: the decode device and Accelerate's process state."""

from __future__ import annotations

import pytest
import torch

from icot.devices import decode_device, process_state
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
