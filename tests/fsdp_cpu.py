"""``icot`` under Accelerate's FSDP2 on CPU processes (gloo), for tests/test_training_fsdp.py.

Run as ``ACCELERATE_USE_CPU=true accelerate launch --config_file FSDP.yaml tests/fsdp_cpu.py ARGS``.

Accelerate (1.15) never selects FSDP on CPU processes: with ``ACCELERATE_USE_CPU`` its state is
``MULTI_CPU`` and the FSDP config and plugin are dropped (the run is DDP); without it, each process
trains alone. Every ``AcceleratorState`` made here is therefore given what Accelerate gives it on GPUs
for the same config: ``distributed_type`` FSDP and the plugin read from the launcher's ``FSDP_*``
variables. Everything after (``fully_shard`` in ``Accelerator.prepare``, gradient clipping, state dicts)
is Accelerate's and PyTorch's own code, on the ``gloo`` group Accelerate formed.

Each process writes ``fsdp: rank R holds N of M parameter elements`` to stderr once its model is
sharded, so that a test can tell FSDP from DDP. ``ICOT_TEST_SIGTERM_AT=K`` sends SIGTERM to process 0
at its K-th loss computation (a preemption that reaches one process only).
"""

from __future__ import annotations

import os
import signal
import sys

import accelerate.accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = AcceleratorState.__init__


def _fsdp_init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()


AcceleratorState.__init__ = _fsdp_init
_prepare = accelerate.accelerator.fsdp2_prepare_model


def _reporting_prepare(accelerator, model):
    model = _prepare(accelerator, model)
    local = sum(getattr(p, "_local_tensor", p).numel() for p in model.parameters())
    whole = sum(p.numel() for p in model.parameters())
    print(f"fsdp: rank {accelerator.process_index} holds {local} of {whole} parameter elements", file=sys.stderr,
          flush=True)
    return model


accelerate.accelerator.fsdp2_prepare_model = _reporting_prepare

if os.environ.get("ICOT_TEST_SIGTERM_AT") and os.environ.get("RANK", "0") == "0":
    from icot.training import stages
    from interrupts import signal_at_call  # this script's folder, tests/, is first on sys.path

    _build = stages.build

    def _signalling_build(name, config, **dirs):
        stage = _build(name, config, **dirs)
        signal_at_call(stage, int(os.environ["ICOT_TEST_SIGTERM_AT"]), signal.SIGTERM)
        return stage

    stages.build = _signalling_build

from icot.cli import main  # noqa: E402  (after the patches above)

# main() has ended the process group (icot.training.distributed.end_process_group). This harness then leaves
# without the interpreter's own teardown: FSDP2 over gloo is a pairing Accelerate does not offer (see above),
# and 1 launch in 20 to 40 on a loaded machine aborted once its stage had finished and written everything the
# tests check (SIGABRT, "terminate called without an active exception"). The tests check the run itself.
code = main()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
