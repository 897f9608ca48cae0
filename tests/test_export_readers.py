"""The exported file, read by an independent loader (diffusers'), reproduces the engine's prediction."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin
from safetensors.torch import load_file

from loraloom.training.families import flux, flux_vae
from loraloom.training.session import Session


def diffusers_prediction(transformer_path, lora_path, x, t, text, guidance):
    """Load the base fresh, apply the LoRA file with diffusers' own Flux LoRA loader, predict."""
    model = flux.load_transformer(transformer_path, torch.float32, )
    state, alphas = FluxLoraLoaderMixin.lora_state_dict(load_file(lora_path), return_alphas=True)
    FluxLoraLoaderMixin.load_lora_into_transformer(state, network_alphas=alphas, transformer=model)
    with torch.no_grad():
        return flux.velocity(model, x, t, text, guidance)


def _trained_session(make_config, targets, **train):
    session = Session.open(make_config(adapter={"targets": targets, "rank": 4, "alpha": 2.0},
                                       train={"steps": 3, **train}, optimizer={"lr": 5e-2}))
    session.run()
    return session


@pytest.mark.parametrize("targets", ["attention", "all_linear"])
def test_diffusers_loader_reproduces_engine_prediction(make_config, targets):
    session = _trained_session(make_config, targets)
    path = session.export(dtype="fp32")
    item = session.val_items[0]
    x = flux_vae.scale_latents(item.latent[None])
    t = torch.tensor([0.7])
    text = {k: v[None] for k, v in item.text.items()}
    ours = session.predict(x, t, text, guidance=1.0)
    base = session.predict(x, t, text, guidance=1.0, adapter=False)
    theirs = diffusers_prediction(session.cfg.model.diffusion_model, path, x, t, text, 1.0)
    assert (ours - base).abs().max() > 1e-3  # the adapter matters, so agreement means something
    assert ((theirs - ours).norm() / ours.norm()).item() < 1e-4


@pytest.mark.slow
def test_real_width_export_reproduced_by_diffusers(tmp_path, real_width_with_lora):
    """Flux's real widths (3072 hidden, 4096 context, 768 pooled), one double + one single block."""
    files, model, _, lora_path = real_width_with_lora(tmp_path, alpha=4.0, seed=1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 8, 8, generator=g)
    text = {"t5": torch.randn(1, 8, 4096, generator=g), "pooled": torch.randn(1, 768, generator=g)}
    t = torch.tensor([0.5])
    with torch.no_grad():
        ours = flux.velocity(model, x, t, text, 1.0)
    del model
    theirs = diffusers_prediction(files["diffusion_model"], lora_path, x, t, text, 1.0)
    assert ((theirs - ours).norm() / ours.norm()).item() < 1e-4
