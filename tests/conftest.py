"""Shared fixtures: tiny Flux files in every user layout, a generated dataset, configs written as TOML."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from loraloom.training.config import MODEL_FILES, RunConfig, load_config, to_toml
from loraloom.training.demo_data import write_shapes_dataset
from loraloom.training.families import family

FLUX = family("flux")


@pytest.fixture(scope="session")
def tiny_parts():
    return FLUX.tiny(seed=0, words=("zwx", "disc"))


@pytest.fixture(scope="session")
def tiny_files(tiny_parts, tmp_path_factory) -> dict[str, Path]:
    return FLUX.write_tiny(tiny_parts, tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def family_files(tiny_files, tmp_path_factory):
    """``family_files(name)``: the tiny files of any registered family, written once per test session."""
    written = {"flux": tiny_files}

    def files(name: str) -> dict[str, Path]:
        if name not in written:
            kit = family(name)
            written[name] = kit.write_tiny(kit.tiny(seed=0, words=("zwx", "disc")), tmp_path_factory.mktemp(name))
        return written[name]
    return files


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "images"
    write_shapes_dataset(folder, count=8, size=64, seed=0, trigger="zwx")
    return folder


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One encoder cache for the whole test session: entries are keyed by content, so sharing is safe."""
    return tmp_path_factory.mktemp("cache")


def tiny_config(files: dict[str, Path], images: Path, run_dir: Path, cache: Path | None = None,
                family_name: str = "flux", **sections) -> RunConfig:
    """A fast fp32 config over the tiny files of ``family_name``; ``sections`` override fields, e.g.
    train={"steps": 3}."""
    cfg = RunConfig()
    base = {
        "model": dict(family=family_name, **{slot: str(files[slot]) for slot in MODEL_FILES if slot in files},
                      text_length=16),
        "data": dict(images=str(images), resolution=64, validation_images=2,
                     cache_dir=str(cache or run_dir.parent / "cache")),
        "adapter": dict(rank=4, alpha=8.0),
        "optimizer": dict(lr=1e-3, warmup_steps=0, scheduler="constant"),
        "train": dict(steps=4, batch_size=2, mixed_precision="fp32", gradient_checkpointing=False,
                      checkpoint_every=0, validate_every=0),
        "output": dict(run_dir=str(run_dir)),
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return replace(cfg, **{name: replace(getattr(cfg, name), **values) for name, values in base.items()})


def write_config(cfg: RunConfig, path: Path) -> Path:
    path.write_text(to_toml(cfg))
    return path


@pytest.fixture
def make_config(family_files, shapes_folder, shared_cache, tmp_path):
    """Build a tiny run config (validated through the TOML loader, as a user's would be); ``family_name`` picks
    the family (Flux by default)."""
    def make(run: str = "run", family_name: str = "flux", **sections) -> RunConfig:
        cfg = tiny_config(family_files(family_name), shapes_folder, tmp_path / run, shared_cache, family_name,
                          **sections)
        return load_config(write_config(cfg, tmp_path / f"{run}.toml"))
    return make


@pytest.fixture
def real_width_with_lora():
    """See :func:`build_real_width_with_lora`."""
    return build_real_width_with_lora


def build_real_width_with_lora(folder: Path, alpha: float, seed: int = 0, settings=None, std: float = 0.02):
    """A real-width Flux (3072 hidden, 4096 context, 768 pooled; 1 + 1 blocks) written in the BFL layout,
    loaded back in fp32 with an adapter on every linear layer (``settings``: an AdapterConfig, by default a
    rank-4 LoRA of this alpha) whose every trainable tensor is random (factors N(0, std); a DoRA magnitude ±10%
    around its start), as after training, and that adapter exported. Returns (files, model, adapter, path)."""
    import torch

    from loraloom.training import adapters
    from loraloom.training.config import AdapterConfig
    from loraloom.training.export import write_adapter
    from loraloom.training.families import flux
    from loraloom.training.families.base import DENOISER

    files = FLUX.write_tiny(FLUX.tiny(seed=seed, real_width=True), folder / "models", diffusers=False)
    model = flux.load_transformer(files["diffusion_model"], torch.float32)
    adapter = adapters.attach({DENOISER: model}, {DENOISER: flux.TARGETS["all_linear"]},
                              settings or AdapterConfig(rank=4, alpha=alpha), seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g)
                p.copy_(p * (1 + 0.1 * noise) if name.endswith("dora_scale") else noise * std)
    lora_path = write_adapter(folder / "lora.safetensors", adapter.export(), FLUX, torch.float32, {})
    return files, model, adapter, lora_path
