"""Training maths as pure functions: timestep sampling and the flow-matching objective.

Convention (Flux): t in [0, 1], t = 0 is the clean image and t = 1 pure noise.
"""

from __future__ import annotations

import math

import torch


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """``t' = shift·t / (1 + (shift-1)·t)``: shift > 1 moves samples towards noise. Shape kept."""
    return shift * t / (1 + (shift - 1) * t)


def auto_shift(image_tokens: int, base_tokens: int = 256, max_tokens: int = 4096,
               base_mu: float = 0.5, max_mu: float = 1.15) -> float:
    """Flux's resolution-dependent shift: mu linear in packed token count, shift = e^mu.

    ``image_tokens`` is (H/16)·(W/16) for an H×W image (VAE factor 8, patch 2).
    """
    slope = (max_mu - base_mu) / (max_tokens - base_tokens)
    mu = base_mu + slope * (image_tokens - base_tokens)
    return math.exp(mu)


def sample_timesteps(kind: str, n: int, generator: torch.Generator, *, sigmoid_scale: float = 1.0,
                     shift: float = 3.0, image_tokens: int = 1024) -> torch.Tensor:
    """``n`` training timesteps in (0, 1), float32, shape (n,).

    kind: 'uniform'; 'sigmoid' (logit-normal, t = sigmoid(s·N(0,1))); 'shift' (sigmoid, then a fixed
    shift); 'auto_shift' (sigmoid, then the shift Flux uses at this resolution).
    """
    if kind == "uniform":
        return torch.rand(n, generator=generator)
    t = torch.sigmoid(sigmoid_scale * torch.randn(n, generator=generator))
    if kind == "sigmoid":
        return t
    if kind == "shift":
        return shift_timesteps(t, shift)
    if kind == "auto_shift":
        return shift_timesteps(t, auto_shift(image_tokens))
    raise ValueError(f"unknown timestep sampling {kind!r}")


def flow_match_inputs(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy input and velocity target for rectified flow.

    x0, noise: (B, ...); t: (B,). Returns x_t = (1-t)·x0 + t·noise and target = noise - x0, both (B, ...).
    """
    tb = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - tb) * x0 + tb * noise, noise - x0


def validation_timesteps(n: int) -> torch.Tensor:
    """``n`` fixed timesteps spread evenly over (0, 1): the same every evaluation. Shape (n,)."""
    return (torch.arange(n, dtype=torch.float32) + 0.5) / n


def inference_sigmas(steps: int, image_tokens: int) -> torch.Tensor:
    """Flux's sampling schedule: ``steps + 1`` sigmas from 1 to 0, auto-shifted for the resolution."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    return shift_timesteps(t, auto_shift(image_tokens))
