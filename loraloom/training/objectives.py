"""Training maths as pure functions: timestep sampling, the flow-matching objective, and the DDPM pieces of
noise-prediction models (schedules, epsilon / v targets, SNR loss weights, noise offset).

Convention (every family): t in [0, 1], t = 0 is the clean image and t = 1 pure noise.
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


# ---------------------------------------------------------------- noise-prediction (DDPM) models
#
# Discrete schedules of T steps (SDXL: 1000), index i in [0, T-1], i = T-1 the noisiest. The engine's time t in
# [0, 1] maps to the index i = round(t·(T-1)) at the family boundary (:func:`timestep_index`), so t = 0 is the
# cleanest step and t = 1 the noisiest, as in the flow-matching families.


def scaled_linear_betas(steps: int = 1000, start: float = 0.00085, end: float = 0.012) -> torch.Tensor:
    """(steps,) float64 betas = linspace(√start, √end, steps)²: SDXL's "scaled_linear" schedule (ComfyUI's
    "linear" is the same formula)."""
    return torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float64) ** 2


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """(T,) ᾱ_i = ∏_{s≤i} (1 - β_s)."""
    return torch.cumprod(1.0 - betas, dim=0)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas (T,) rescaled so the last step has ᾱ = 0 (SNR 0) and the first keeps its ᾱ (Lin et al. 2023,
    arXiv 2305.08891, Algorithm 1; diffusers' ``rescale_zero_terminal_snr``). The last beta becomes 1. Only
    v-prediction can be trained to the end of such a schedule: epsilon is undefined from pure noise."""
    root = alphas_cumprod(betas).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    abar = ((root - last) * first / (first - last)) ** 2
    return 1.0 - torch.cat([abar[:1], abar[1:] / abar[:-1]])


def snr(abar: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ / (1 - ᾱ), shape kept; 0 at a zero-terminal-SNR last step."""
    return abar / (1.0 - abar)


def timestep_index(t: torch.Tensor, steps: int) -> torch.Tensor:
    """Engine time t in [0, 1] (B,) → the discrete step index round(t·(steps-1)) (B,) long."""
    return torch.round(t.double().clamp(0, 1) * (steps - 1)).long()


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def ddpm_inputs(x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor, prediction: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy input and target of a DDPM model. x0, noise: (B, ...); ᾱ at each sample's step: (B,).

    Returns x_t = √ᾱ·x0 + √(1-ᾱ)·noise and the target: the noise for "epsilon", v = √ᾱ·noise - √(1-ᾱ)·x0
    (Salimans & Ho 2022; diffusers' ``get_velocity``) for "v_prediction"."""
    a = _per_sample(abar, x0)
    inputs = a.sqrt() * x0 + (1 - a).sqrt() * noise
    if prediction == "epsilon":
        return inputs, noise
    if prediction == "v_prediction":
        return inputs, a.sqrt() * noise - (1 - a).sqrt() * x0
    raise ValueError(f"prediction must be 'epsilon' or 'v_prediction', not {prediction!r}")


def min_snr_weights(snr_t: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023) of the MSE on the model's own target, (B,) → (B,):
    min(SNR, γ) / SNR for epsilon, min(SNR, γ) / (SNR + 1) for v-prediction (where the v-MSE is the x0-MSE
    times SNR + 1). For epsilon at SNR 0 the weight is undefined; that step is only reachable with zero terminal
    SNR, which needs v-prediction."""
    clipped = snr_t.clamp(max=gamma)
    if prediction == "epsilon":
        return clipped / snr_t
    if prediction == "v_prediction":
        return clipped / (snr_t + 1)
    raise ValueError(f"prediction must be 'epsilon' or 'v_prediction', not {prediction!r}")


def debiased_weights(snr_t: torch.Tensor, cap: float = 1000.0, floor: float = 1e-3) -> torch.Tensor:
    """Debiased estimation (Yu et al. 2023) as sd-scripts weighs every prediction type: 1/√min(SNR, 1000),
    (B,) → (B,). SNR is floored at ``floor`` so the zero-terminal-SNR step gets a finite weight (≤ 31.6)."""
    return 1.0 / snr_t.clamp(min=floor, max=cap).sqrt()


def offset_noise(noise: torch.Tensor, offset: float, generator: torch.Generator) -> torch.Tensor:
    """noise + offset·N(0, 1) of shape (B, C, 1, 1) (Guttenberg's noise offset, sd-scripts' --noise_offset):
    one value per sample and channel, constant over the image, so the model learns to shift the mean
    brightness. noise: (B, C, H, W); unchanged (and no draw made) at offset 0."""
    if offset == 0:
        return noise
    return noise + offset * torch.randn(*noise.shape[:2], 1, 1, generator=generator).to(noise)


def discrete_sigmas(abar: torch.Tensor, zero_terminal_snr: bool = False) -> torch.Tensor:
    """(T,) float32 σ_i = √((1-ᾱ_i)/ᾱ_i): the sigma table ComfyUI samples a DDPM model on
    (``ModelSamplingDiscrete``). With zero terminal SNR ComfyUI pins the last ᾱ to 4.8973451890853435e-08
    (σ ≈ 4519) instead of 0, keeping σ finite; so does this."""
    if zero_terminal_snr:
        abar = abar.clone()
        abar[-1] = 4.8973451890853435e-08
    return ((1 - abar) / abar).sqrt().float()
