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
    full = FLUX.full_size()
    model = torch.nn.Module.to(full.denoiser, torch.bfloat16)
    cfg = RunConfig()
    cfg = dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, rank=16, alpha=16.0))
    return memory.measure(model, FLUX, cfg, torch.empty(16, 64, 64), full.text,
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
    (80, ("auto", False, "none", False)),
    (48, ("auto", False, "none", False)),  # 46.9 GB without checkpointing
    (32, ("auto", True, "none", False)),  # 29.3 GB
    (24, ("fp8", True, "none", False)),  # 16.2 GB
    (16, ("nf4", True, "none", False)),  # 10.0 GB
    (12, ("nf4", True, "none", False)),
    (8, ("nf4", True, "blocks", False)),  # 3.6 GB
    (3.5, ("nf4", True, "blocks", True)),  # 3.0 GB
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
def test_every_family_gets_a_plan(name, tmp_path, shapes_folder):
    """Lumina 2 reads its caption mask's lengths and SDXL its window counts while they run: the meta-device
    estimate has them (MetaValues)."""
    family = FAMILIES[name]
    files = family.write_tiny(family.tiny(seed=0), tmp_path / "models", diffusers=False)

    def config(budget: float, run: str):
        return config_from_dict({
            "model": {"family": name, **{s: str(files[s]) for s in MODEL_FILES if s in files}, "text_length": 16,
                      "vram_budget": budget},
            "data": {"images": str(shapes_folder), "resolution": 64, "validation_images": 1,
                     "cache_dir": str(tmp_path / "cache")},
            "train": {"steps": 1, "mixed_precision": "fp32"}, "output": {"run_dir": str(tmp_path / run)}})

    roomy = Session.open(config(1000.0, "roomy")).memory_plan
    assert roomy.fits and not roomy.gradient_checkpointing and roomy.offload == "none"
    with pytest.warns(UserWarning, match="nothing fits"):
        tight = Session.open(config(0.001, "tight")).memory_plan
    assert tight.offload == "blocks" and tight.gradient_checkpointing and not tight.fits


def test_a_model_that_reads_what_it_computes_gets_an_error_that_says_what_to_set(make_config, monkeypatch):
    """Values the model computes from its weights do not exist on the meta device."""
    predict = type(FLUX).predict

    def reads_its_output(self, *args):
        out = predict(self, *args)
        return out * float(out.detach().abs().max())

    monkeypatch.setattr(type(FLUX), "predict", reads_its_output)
    with pytest.raises(ConfigError, match=r"model.vram_budget cannot estimate Flux.* Set model.vram_budget = 0"):
        Session.open(make_config(model={"vram_budget": 24.0}))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_activation_estimate_is_what_a_real_forward_pass_saves(name):
    """The meta-device count of what autograd saves equals the bytes a real forward pass keeps for backward,
    counted by storage (a tensor saved twice, or as views, counts once; weights not at all), with and without
    gradient checkpointing. On the CPU in fp32, with FlashAttention as a GPU runs it."""
    family = FAMILIES[name]
    tiny = family.tiny(seed=0)
    with torch.no_grad():
        text = {k: v[0] for k, v in family.encode_text(tiny.text, ["a red disc on a yellow background"]).items()}
    cfg = RunConfig()
    cfg = dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, rank=4),
                              train=dataclasses.replace(cfg.train, batch_size=2))
    latent, geometry = torch.randn(family.latent_channels, 16, 16), Geometry((128, 128), (0, 0), (128, 128))
    sizes = memory.measure(tiny.denoiser, family, cfg, latent, text, geometry, torch.float32)

    model = tiny.denoiser
    memory.attach_adapter(model, family, cfg.adapter)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    model.train()
    for checkpointing, estimate in ((False, sizes.activations),
                                    (True, sizes.activations_checkpointed - sizes.activations_offloaded)):
        if checkpointing:
            model.enable_gradient_checkpointing()
        storages: dict[int, int] = {}

        def pack(tensor: torch.Tensor, storages=storages) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with (torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION),
              torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)):
            family.predict(model, latent.expand(2, *latent.shape), torch.full((2,), 0.5),
                           {k: v.expand(2, *v.shape) for k, v in text.items()}, [geometry] * 2, 1.0)
        # Within 0.1%: the meta kernels' random-number seeds of FlashAttention, 24 bytes a call.
        assert estimate == pytest.approx(sum(storages.values()), rel=1e-3)


@pytest.mark.parametrize("name, parameters", [("flux", 11.90e9), ("lumina2", 2.61e9), ("sdxl", 2.567e9)])
def test_full_size_is_the_released_model(name, parameters):
    full = FAMILIES[name].full_size()
    assert sum(p.numel() for p in full.denoiser.parameters()) == pytest.approx(parameters, rel=2e-3)
    assert full.vae_factor == 8


def test_meta_values_answer_reads_through_operations_on_the_inputs():
    values = memory.MetaValues()
    given = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    mask = values.tensor(given, torch.bfloat16)
    assert mask.is_meta and mask.dtype == torch.bfloat16
    weight = torch.empty(3, 3, device="meta")
    with values:
        assert (mask > 0).sum(1).tolist() == [2, 1]
        assert int(mask.to("meta").sum()) == 3
        with pytest.raises(RuntimeError, match="meta tensors"):  # mixed with a tensor without values: no values
            (mask @ weight).sum().item()
        written = mask.clone()
        assert written.sum().item() == 3
        written.mul_(weight[:2])  # written into by something without values: forgotten, not stale
        with pytest.raises(RuntimeError, match="meta tensors"):
            written.sum().item()
        mask[0, 2] = 1.0  # written into with values: kept up to date
        assert mask.sum().item() == 4 and given.sum() == 3
        mask[1] = weight[0]  # item assignment without values
        with pytest.raises(RuntimeError, match="meta tensors"):
            mask.sum().item()
