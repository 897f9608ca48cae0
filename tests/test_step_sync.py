"""A training step reads one value from the device: the loss and gradient norm together, at its end.

On a GPU every read of a tensor's value (``.item()``, ``.tolist()``, ``bool(t)``, ...) waits for all queued work,
so the step makes exactly one. This CPU test counts such reads made by any code but torch's own (the
optimizer's step counters live on the host; fused AdamW on CUDA keeps them on the device) during whole steps.
Blocking host-to-device copies, the other kind of synchronisation, are not visible on a CPU: the step copies
through pinned memory without blocking (``session.to_device``), and ``benchmarks/gpu.py`` counts every
synchronisation on a GPU with torch's sync debug mode.
"""

from __future__ import annotations

import collections
import traceback
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from loraloom.training.session import Session

READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
         torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy}
TORCH = str(Path(torch.__file__).parent)


class HostReads(TorchFunctionMode):
    """Counts reads of tensor values by (file, function) of the first caller outside torch."""

    def __init__(self):
        super().__init__()
        self.reads: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS:
            caller = next((f for f in reversed(traceback.extract_stack()[:-1]) if not f.filename.startswith(TORCH)),
                          None)
            if caller is not None and not any(f.filename.startswith(TORCH) and "/optim/" in f.filename
                                              for f in traceback.extract_stack()[-4:-1]):
                self.reads[(Path(caller.filename).name, caller.name)] += 1
        return func(*args, **(kwargs or {}))


def test_one_host_read_per_step(make_config):
    session = Session.open(make_config(
        "sync", train={"steps": 4, "gradient_accumulation": 2, "gradient_checkpointing": True},
        adapter={"dropout": 0.1}, model={"offload": "blocks"}))
    session.step(1)  # the first step builds what is built once
    counter = HostReads()
    with counter:
        session.step(3)
    assert dict(counter.reads) == {("session.py", "_train_step_inner"): 3}
