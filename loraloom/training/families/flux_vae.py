"""What Flux and Lumina 2 share: the 16-channel Flux VAE (ae.safetensors) and flow matching on its latents, read
by the transformer in 2x2 patches."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..objectives import flow_match_inputs, sample_timesteps
from ..precision import DTYPES
from . import parts
from .base import Noised

if TYPE_CHECKING:
    from ..config import ModelConfig, TrainConfig

# ComfyUI's latent_format.Flux (its Lumina2 model uses it too): the transformer sees (latent - shift) * scale.
LATENT_SHIFT = 0.1159
LATENT_SCALE = 0.3611


def scale_latents(raw: torch.Tensor) -> torch.Tensor:
    return (raw - LATENT_SHIFT) * LATENT_SCALE


def unscale_latents(x: torch.Tensor) -> torch.Tensor:
    return x / LATENT_SCALE + LATENT_SHIFT


def image_tokens(h: int, w: int) -> int:
    """2x2 patches of an (h, w) latent: what the resolution-dependent shift reads."""
    return (h // 2) * (w // 2)


class FluxVaeFlowMatching:
    """The :class:`.base.Family` methods of a flow-matching model on Flux VAE latents (listed before Family in
    the bases)."""

    latent_channels = 16
    latent_scale, latent_shift = LATENT_SCALE, LATENT_SHIFT

    def load_vae(self, model: ModelConfig) -> torch.nn.Module:
        return parts.load_vae(model.vae, "the Flux VAE (ae.safetensors)", DTYPES[model.vae_precision],
                              model.allow_pickle)

    def noised(self, latents: torch.Tensor, train: TrainConfig, generator: torch.Generator,
               t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> Noised:
        x0 = scale_latents(latents)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator)
        if t is None:
            t = sample_timesteps(train.timesteps, len(x0), generator, sigmoid_scale=train.sigmoid_scale,
                                 shift=train.shift, image_tokens=image_tokens(*x0.shape[-2:]))
        inputs, target = flow_match_inputs(x0, noise, t)
        return Noised(inputs, noise, t, target, torch.ones(len(x0)))
