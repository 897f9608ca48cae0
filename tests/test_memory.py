"""model.vram_budget: sizes measured on the meta device, and the pure choice of what fits."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from loraloom.training import memory
from loraloom.training.config import MODEL_FILES, ConfigError, RunConfig, config_from_dict
from loraloom.training.families import FAMILIES, family
from loraloom.training.families.base import Geometry
from loraloom.training.metrics import read_metrics
from loraloom.training.session import Session

FLUX = family("flux")


@pytest.fixture(scope="module")
def full_flux_sizes() -> memory.Sizes:
    """Full Flux (19 + 38 blocks, 11.9B parameters) in bf16 on the meta device, rank-16 LoRA on attention and
    MLP, one 512 x 512 image: measured without memory or arithmetic."""
    model = torch.nn.Module.to(FLUX.full_size().denoiser, torch.bfloat16)
    cfg = RunConfig()
    cfg = dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, rank=16, alpha=16.0))
    text = {"t5": torch.empty(512, 4096), "pooled": torch.empty(768)}
    return memory.measure(model, FLUX, cfg, torch.empty(16, 64, 64), text,
                          Geometry((512, 512), (0, 0), (512, 512)), torch.bfloat16)


def test_full_flux_sizes(full_flux_sizes):
    s = full_flux_sizes
    gb = memory.GB
    assert 23.5 < s.weights["auto"] / gb < 24.2  # 11.9B parameters in bf16
    assert 11.8 < s.weights["fp8"] / gb < 12.4
    assert 6.0 < s.weights["nf4"] / gb < 6.6
    assert s.largest_block["auto"] < s.weights["auto"] / 30  # a double block is ~0.34B parameters
    assert s.activations > 10 * s.activations_checkpointed > 10 * s.activations_offloaded


@pytest.mark.parametrize("budget, expected", [
    (80, ("auto", False, "none", False)),  # 69 GB without checkpointing
    (48, ("auto", True, "none", False)),  # 30 GB
    (24, ("fp8", True, "none", False)),  # 17 GB
    (16, ("nf4", True, "none", False)),  # 10.5 GB
    (12, ("nf4", True, "none", False)),
    (8, ("nf4", True, "blocks", False)),  # 4.2 GB
    (4, ("nf4", True, "blocks", True)),  # 3.6 GB
])
def test_budget_presets_for_full_flux_at_512(full_flux_sizes, budget, expected):
    plan = memory.plan(budget, full_flux_sizes)
    assert (plan.base_precision, plan.gradient_checkpointing, plan.offload, plan.offload_activations) == expected
    assert plan.fits and plan.estimate_gb <= budget and f"of {budget} GB" in plan.reason


def test_the_plan_is_the_cheapest_fitting_rung():
    """Each rung of the ladder needs less memory than the one before; the plan takes the first that fits."""
    gb = int(memory.GB)
    sizes = memory.Sizes(weights={"auto": 20 * gb, "fp8": 10 * gb, "nf4": 5 * gb},
                         outside_blocks={"auto": gb, "fp8": gb, "nf4": gb},
                         largest_block={"auto": gb // 2, "fp8": gb // 4, "nf4": gb // 8},
                         adapter=gb // 10, activations=30 * gb, activations_checkpointed=2 * gb,
                         activations_offloaded=gb // 2)
    needs = [memory.estimate(sizes, *rung)["total"] for rung in memory.LADDER]
    assert needs == sorted(needs, reverse=True)
    for rung, need in zip(memory.LADDER, needs):
        assert memory.plan(need / memory.GB, sizes).base_precision == rung[0]
    frugal = memory.plan(0.5, sizes)
    assert not frugal.fits and frugal.offload_activations and "nothing fits" in frugal.reason
    whole = [memory.plan(need / memory.GB, sizes, quantize=False) for need in needs]
    assert {p.base_precision for p in whole} == {"auto"}  # a full fine-tune trains unquantised weights
    assert [(p.gradient_checkpointing, p.offload) for p in whole][-1] == (True, "blocks")
    stored_fp8 = dataclasses.replace(sizes, weights={"auto": 10 * gb, "fp8": 10 * gb, "nf4": 5 * gb})
    need = memory.estimate(stored_fp8, "auto", True, "none", False)["total"] / memory.GB
    assert memory.plan(need, stored_fp8).base_precision == "auto"
    assert memory.plan(need - 0.1, stored_fp8).base_precision == "nf4"  # fp8 would gain nothing: skipped


def test_the_session_applies_and_logs_its_plan(make_config):
    roomy = Session.open(make_config("roomy", model={"vram_budget": 1000.0}))
    assert roomy.memory_plan.base_precision == "auto" and not roomy.memory_plan.gradient_checkpointing
    with pytest.warns(UserWarning, match="nothing fits"):
        tight = Session.open(make_config("tight", model={"vram_budget": 0.001}))
    plan = tight.memory_plan
    assert (plan.base_precision, plan.gradient_checkpointing, plan.offload, plan.offload_activations) == (
        "nf4", True, "blocks", True)
    assert type(tight.denoiser.transformer_blocks[0].attn.to_k.base_layer).__name__ == "Linear4bit"
    assert tight.block_offload is not None and tight.activation_offload is not None
    assert tight.denoiser.is_gradient_checkpointing
    tight.step(1)
    [event] = [r for r in read_metrics(tight.run_dir) if r["type"] == "memory_plan"]
    assert event["offload"] == "blocks" and event["budget_gb"] == 0.001 and not event["fits"]
    [event] = [r for r in read_metrics(roomy.run_dir) if r["type"] == "memory_plan"]
    assert event["budget_gb"] == 1000.0


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_gets_a_plan_or_an_error_that_says_what_to_set(name, tmp_path, shapes_folder):
    family = FAMILIES[name]
    files = family.write_tiny(family.tiny(seed=0), tmp_path / "models", diffusers=False)
    cfg = config_from_dict({
        "model": {"family": name, **{s: str(files[s]) for s in MODEL_FILES if s in files}, "text_length": 16,
                  "vram_budget": 1000.0},
        "data": {"images": str(shapes_folder), "resolution": 64, "validation_images": 1,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"steps": 1, "mixed_precision": "fp32"}, "output": {"run_dir": str(tmp_path / "run")}})
    if name == "flux":
        assert Session.open(cfg).memory_plan.fits
    else:  # their models read caption masks / window counts while running, which meta tensors do not hold
        with pytest.raises(ConfigError, match=r"model.vram_budget cannot estimate .* Set model.vram_budget = 0"):
            Session.open(cfg)
