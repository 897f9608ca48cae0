"""LoRA dropout on the rank-r activation (adapter.dropout_on = "rank") against its definition, and in training."""

from __future__ import annotations

import pytest
import torch

from loraloom.training import adapters
from loraloom.training.config import AdapterConfig
from loraloom.training.families.base import DENOISER
from loraloom.training.metrics import read_metrics
from loraloom.training.session import Session

P = 0.25


def _layer(dropout_on: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A 16 -> 8 Linear with a rank-8 LoRA whose B is the identity and whose scale is 1: the LoRA's output is
    exactly what reaches B, (dropped-out) A x. Returns the model, A (8, 16) and W (8, 16)."""
    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(16, 8, bias=False)})
    adapter = adapters.attach({DENOISER: model}, {DENOISER: "proj"},
                              AdapterConfig(rank=8, alpha=8.0, dropout=P, dropout_on=dropout_on), seed=0)
    layer = adapter.layers[f"{DENOISER}.proj"]
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(torch.eye(8))
    return model, layer.lora_A["default"].weight.detach(), layer.base_layer.weight.detach()


def test_rank_dropout_drops_entries_of_a_x_and_scales_the_rest():
    model, a, w = _layer("rank")
    x = torch.randn(4096, 16, generator=torch.Generator().manual_seed(1))
    ax = x @ a.T
    model.train()
    with torch.no_grad():
        delta = model["proj"](x) - x @ w.T
    dropped = delta.abs() < 1e-6
    # Every entry is either dropped or (A x) / (1 - p): dropout on the rank-r activation, by definition.
    torch.testing.assert_close(delta[~dropped], (ax / (1 - P))[~dropped], rtol=1e-5, atol=1e-5)
    assert abs(dropped.float().mean().item() - P) < 0.01  # 32768 draws: p within ~4 standard deviations
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model["proj"](x), x @ w.T + ax, rtol=1e-5, atol=1e-5)


def test_input_dropout_is_not_entrywise_on_a_x():
    """peft's form drops entries of x, so A x's entries are mixtures, not dropped-or-scaled values."""
    model, a, w = _layer("input")
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
    model.train()
    with torch.no_grad():
        delta = model["proj"](x) - x @ w.T
    scaled = x @ a.T / (1 - P)
    entrywise = (delta.abs() < 1e-6) | torch.isclose(delta, scaled, rtol=1e-5, atol=1e-5)
    assert entrywise.float().mean() < 0.5


@pytest.mark.parametrize("dropout_on", ["rank", "input"])
def test_dropout_trains_and_is_reproducible(make_config, dropout_on):
    runs = []
    for name in ("a", "b"):
        session = Session.open(make_config(f"{dropout_on}-{name}", train={"steps": 3}, optimizer={"lr": 3e-3},
                                           adapter={"dropout": 0.3, "dropout_on": dropout_on}))
        session.run()
        runs.append(session)
    a, b = (s.adapter.state() for s in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the dropout masks come from the run's seeded RNG
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # B left zero: gradients flowed
    losses = [r["loss"] for r in read_metrics(runs[0].run_dir) if r["type"] == "step"]
    assert len(losses) == 3 and all(loss > 0 for loss in losses)


def test_a_checkpoint_from_before_the_choice_resumes_only_with_input_dropout(make_config):
    """Checkpoints written before adapter.dropout_on trained with peft's input dropout: a resume with the new
    default would train something else, and says so."""
    import hashlib
    import json

    from loraloom.training import checkpoint
    from loraloom.training.config import ConfigError

    first = Session.open(make_config("old", train={"steps": 2, "checkpoint_every": 1},
                                     adapter={"dropout": 0.1, "dropout_on": "input"}))
    first.step(1)
    [step] = [f for f in checkpoint.checkpoint_dir(first.run_dir).iterdir() if f.is_dir()]
    saved = json.loads((step / "config.json").read_text())
    del saved["adapter"]["dropout_on"]
    data = json.dumps(saved).encode()
    (step / "config.json").write_bytes(data)
    manifest = json.loads((step / checkpoint.MANIFEST).read_text())
    manifest["files"]["config.json"] = hashlib.sha256(data).hexdigest()
    (step / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"adapter\.dropout_on changed from 'input' to 'rank'"):
        Session.open(make_config("old", train={"steps": 2, "checkpoint_every": 1}, adapter={"dropout": 0.1}))
    resumed = Session.open(make_config("old", train={"steps": 2, "checkpoint_every": 1},
                                       adapter={"dropout": 0.1, "dropout_on": "input"}))
    assert resumed.state.step == 1
