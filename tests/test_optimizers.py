"""Every registered optimizer steps; a missing bitsandbytes gives a message that says what to do."""

from __future__ import annotations

import sys

import pytest
import torch

from loraloom.training.config import ConfigError, OptimizerConfig
from loraloom.training.optimizers import OPTIMIZERS, make_optimizer


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_optimizer_reduces_a_quadratic(name):
    if name != "adamw":
        pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 64))  # bitsandbytes keeps 8-bit state only for >= 4096 elements
    opt, sched = make_optimizer([w], OptimizerConfig(name=name, lr=1e-2, weight_decay=0.0), total_steps=50)
    start = (w ** 2).sum().item()
    for _ in range(50):
        (w ** 2).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    assert (w ** 2).sum().item() < 0.7 * start


def test_warmup_schedule_ramps_then_holds():
    w = torch.nn.Parameter(torch.zeros(2))
    opt, sched = make_optimizer([w], OptimizerConfig(lr=1.0, warmup_steps=4, scheduler="constant_with_warmup"), 10)
    lrs = []
    for _ in range(6):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_missing_bitsandbytes_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"optimizer.name = 'adamw8bit' needs bitsandbytes.*pip install bitsandbytes"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2))], OptimizerConfig(name="adamw8bit"), 10)
