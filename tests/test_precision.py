"""float8 bases: every linear stored in float8 is cast at use, whatever its name, target or compute precision."""

from __future__ import annotations

import pytest
import torch

from loraloom.training.cli import main
from loraloom.training.metrics import read_metrics
from loraloom.training.precision import Float8Linear, store_float8
from loraloom.training.session import Session


def base_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The base's linear layers (not the adapter's own), by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n}


def test_float8_linear_computes_with_the_upcast_weight_and_saves_only_float8():
    torch.manual_seed(0)
    plain = torch.nn.Linear(48, 32)
    stored = torch.nn.Sequential(torch.nn.Linear(48, 32))
    stored[0].weight.data = plain.weight.data.to(torch.float8_e4m3fn)
    stored[0].bias.data = plain.bias.data.clone()
    assert store_float8(stored) == 1 and isinstance(stored[0], Float8Linear)
    upcast = plain.weight.data.to(torch.float8_e4m3fn).float()
    x = torch.randn(5, 48, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = stored(x)
    assert [t.dtype for t in saved] == [torch.float8_e4m3fn]  # no upcast copy of the weight kept for backward
    torch.testing.assert_close(out, torch.nn.functional.linear(x, upcast, plain.bias))
    out.square().sum().backward()
    reference = x.detach().requires_grad_()
    torch.nn.functional.linear(reference, upcast, plain.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, reference.grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert stored(x).dtype == torch.bfloat16


def test_fp8_conversion_stores_every_linear_weight_and_keeps_biases():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))
    assert store_float8(model, convert=True) == 2
    assert all(isinstance(m, Float8Linear) and m.weight.dtype == torch.float8_e4m3fn for m in (model[0], model[2]))
    assert model[0].bias.dtype == torch.float32 and model[1].weight.dtype == torch.float32


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("targets", ["attention", "attention_mlp", "all_linear"])
def test_an_all_linear_fp8_file_trains_with_every_target(make_config, tiny_files, precision, targets):
    """The kit's fp8 file stores every 2-D weight in fp8, the modulation and embedding layers included."""
    cfg = make_config(f"{targets}-{precision}", model={"diffusion_model": str(tiny_files["diffusion_model_fp8"])},
                      adapter={"targets": targets, "rank": 8, "alpha": 8.0}, optimizer={"lr": 3e-3},
                      train={"steps": 12, "mixed_precision": precision, "gradient_checkpointing": precision == "bf16"})
    session = Session.open(cfg)
    linears = base_linears(session.denoiser)
    assert linears and all(isinstance(m, Float8Linear) and m.weight.dtype == torch.float8_e4m3fn
                           for n, m in linears.items()), [n for n, m in linears.items() if type(m) is torch.nn.Linear]
    stored = [p for p in session.denoiser.parameters() if p.dtype == torch.float8_e4m3fn]
    assert len(stored) == len(linears)  # no float8 tensor outside a Float8Linear
    before = session.validate()
    records = session.step(cfg.train.steps)
    assert all(r["loss"] is not None for r in records)
    assert session.validate() < before
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in base_linears(session.denoiser).values())


def test_cli_trains_an_fp8_file_in_fp32(make_config, tiny_files, tmp_path, capsys):
    make_config("fp8", model={"diffusion_model": str(tiny_files["diffusion_model_fp8"])},
                adapter={"targets": "all_linear"}, train={"steps": 2, "mixed_precision": "fp32"})  # tmp_path/fp8.toml
    assert main(["train", str(tmp_path / "fp8.toml")]) == 0
    assert "adapter:" in capsys.readouterr().out
    losses = [r["loss"] for r in read_metrics(tmp_path / "fp8") if r["type"] == "step"]
    assert len(losses) == 2 and all(loss is not None for loss in losses)
