"""Timestep sampling, the flow-matching objective, and the DDPM objectives of noise-prediction models: against
values computed by hand and diffusers' DDPMScheduler."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from loraloom.training.objectives import (
    alphas_cumprod,
    auto_shift,
    ddpm_inputs,
    debiased_weights,
    discrete_sigmas,
    flow_match_inputs,
    inference_sigmas,
    min_snr_weights,
    offset_noise,
    rescale_zero_terminal_snr,
    sample_timesteps,
    scaled_linear_betas,
    shift_timesteps,
    snr,
    timestep_index,
    validation_timesteps,
)


def test_shift_formula_and_fixed_points():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(shift_timesteps(t, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    assert torch.equal(shift_timesteps(t, 1.0), t)


def test_auto_shift_matches_flux_endpoints():
    assert auto_shift(256) == pytest.approx(math.exp(0.5))
    assert auto_shift(4096) == pytest.approx(math.exp(1.15))
    assert auto_shift(1024) == pytest.approx(math.exp(0.5 + 0.65 * 768 / 3840))  # 512x512 image


@pytest.mark.parametrize("kind", ["uniform", "sigmoid", "shift", "auto_shift"])
def test_sampling_is_seeded_and_inside_the_unit_interval(kind):
    a = sample_timesteps(kind, 4096, torch.Generator().manual_seed(0), shift=3.0, image_tokens=4096)
    b = sample_timesteps(kind, 4096, torch.Generator().manual_seed(0), shift=3.0, image_tokens=4096)
    assert torch.equal(a, b) and a.shape == (4096,) and a.min() > 0 and a.max() < 1


def test_shifts_move_mass_towards_noise_and_scale_spreads():
    g = torch.Generator
    sig = sample_timesteps("sigmoid", 20000, g().manual_seed(0))
    shifted = sample_timesteps("shift", 20000, g().manual_seed(0), shift=3.0)
    assert abs(sig.mean() - 0.5) < 0.01 and shifted.mean() > 0.65
    wide = sample_timesteps("sigmoid", 20000, g().manual_seed(0), sigmoid_scale=2.0)
    assert wide.std() > sig.std()


def test_flow_matching_interpolates_and_targets_velocity():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    xt, target = flow_match_inputs(x0, noise, torch.tensor([0.0, 1.0]))
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], noise[1])
    assert torch.equal(target, noise - x0)
    # Following the target from t=1 for a whole unit of time lands on the clean image (up to float rounding:
    # noise - (noise - x0) loses ~1e-7 absolute where |x0| is tiny, so an absolute tolerance is the right one).
    assert torch.allclose(noise - 1.0 * target, x0, rtol=0, atol=1e-6)


def test_validation_and_inference_schedules():
    assert torch.allclose(validation_timesteps(4), torch.tensor([0.125, 0.375, 0.625, 0.875]))
    s = inference_sigmas(10, 1024)
    assert s.shape == (11,) and s[0] == 1 and s[-1] == 0 and torch.all(s[:-1] > s[1:])


# ---------------------------------------------------------------- DDPM


def test_scaled_linear_schedule_by_hand():
    betas = scaled_linear_betas()
    root0, root1 = math.sqrt(0.00085), math.sqrt(0.012)
    assert betas[0].item() == pytest.approx(0.00085, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.012, rel=1e-12)
    assert betas[1].item() == pytest.approx((root0 + (root1 - root0) / 999) ** 2, rel=1e-12)  # 0.0008546987
    abar = alphas_cumprod(betas)
    assert abar[1].item() == pytest.approx((1 - 0.00085) * (1 - betas[1].item()), rel=1e-12)
    sigmas = discrete_sigmas(abar)  # ComfyUI's SDXL sigma range
    assert sigmas[0].item() == pytest.approx(math.sqrt(0.00085 / 0.99915), rel=1e-6)  # 0.0291675
    assert sigmas[-1].item() == pytest.approx(14.6146, abs=1e-4)


def test_zero_terminal_snr_rescaling():
    betas = scaled_linear_betas()
    abar, zabar = alphas_cumprod(betas), alphas_cumprod(rescale_zero_terminal_snr(betas))
    assert zabar[-1].item() == 0.0 and rescale_zero_terminal_snr(betas)[-1].item() == 1.0
    assert zabar[0].item() == pytest.approx(abar[0].item(), rel=1e-12)  # the first step keeps its SNR
    assert torch.all(zabar[1:] < zabar[:-1])
    assert snr(zabar)[-1].item() == 0.0 and min_snr_weights(snr(zabar)[-1:], 5.0, "v_prediction").item() == 0.0
    pinned = 4.8973451890853435e-08  # ComfyUI keeps the last sigma finite
    assert discrete_sigmas(zabar, zero_terminal_snr=True)[-1].item() == pytest.approx(
        math.sqrt((1 - pinned) / pinned), rel=1e-5)  # 4518.8


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_ddpm_schedule_inputs_and_targets_match_diffusers(zero_terminal_snr):
    betas = scaled_linear_betas()
    ours = alphas_cumprod(rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas)
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                           beta_schedule="scaled_linear", rescale_betas_zero_snr=zero_terminal_snr)
    assert (theirs.alphas_cumprod.double() - ours).abs().max() < 1e-6  # diffusers' betas are float32
    index = torch.tensor([0, 250, 500, 998])
    torch.testing.assert_close(snr(ours)[index].float(), compute_snr(theirs, index), rtol=1e-4, atol=0)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    abar = theirs.alphas_cumprod[index]
    inputs, v = ddpm_inputs(x0, noise, abar, "v_prediction")
    torch.testing.assert_close(inputs, theirs.add_noise(x0, noise, index), rtol=0, atol=1e-6)
    torch.testing.assert_close(v, theirs.get_velocity(x0, noise, index), rtol=0, atol=1e-6)


def test_epsilon_and_v_targets_by_hand():
    # ᾱ = 0.64: √ᾱ = 0.8, √(1-ᾱ) = 0.6; x0 = 1, noise = 2.
    x0, noise, abar = torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 2.0), torch.tensor([0.64])
    inputs, eps = ddpm_inputs(x0, noise, abar, "epsilon")
    assert inputs.item() == pytest.approx(0.8 * 1 + 0.6 * 2) and torch.equal(eps, noise)
    _, v = ddpm_inputs(x0, noise, abar, "v_prediction")
    assert v.item() == pytest.approx(0.8 * 2 - 0.6 * 1)
    with pytest.raises(ValueError, match="v_prediction"):
        ddpm_inputs(x0, noise, abar, "sample")


def test_min_snr_and_debiased_weights_by_hand():
    s = torch.tensor([10.0, 2.0, 5.0])
    torch.testing.assert_close(min_snr_weights(s, 5.0, "epsilon"), torch.tensor([5 / 10, 2 / 2, 5 / 5]))
    torch.testing.assert_close(min_snr_weights(s, 5.0, "v_prediction"), torch.tensor([5 / 11, 2 / 3, 5 / 6]))
    torch.testing.assert_close(debiased_weights(torch.tensor([4.0, 1e6, 0.0])),
                               torch.tensor([1 / 2, 1 / math.sqrt(1000), 1 / math.sqrt(1e-3)]))


def test_noise_offset_is_one_draw_per_sample_and_channel_of_the_given_scale():
    g = torch.Generator().manual_seed(7)
    out = offset_noise(torch.zeros(4096, 4, 3, 5), 0.0357, g)
    assert torch.equal(out, out[..., :1, :1].expand_as(out))  # constant over the image
    means = out[..., 0, 0]
    assert abs(means.mean().item()) < 0.002 and means.std().item() == pytest.approx(0.0357, rel=0.03)
    # Over real noise, each sample-channel's mean brightness spreads by √(offset² + 1/HW) instead of √(1/HW).
    noise = torch.randn(4096, 4, 8, 8, generator=g)
    spread = offset_noise(noise, 0.1, g).mean(dim=(2, 3)).std().item()
    assert spread == pytest.approx(math.sqrt(0.1 ** 2 + 1 / 64), rel=0.03)
    state = g.get_state()
    assert offset_noise(noise, 0.0, g) is noise and torch.equal(g.get_state(), state)  # off: no draw


def test_engine_time_maps_onto_the_discrete_steps_and_back():
    index = torch.arange(1000)
    assert torch.equal(timestep_index(index.float() / 999, 1000), index)
    assert timestep_index(torch.tensor([0.0, 1.0, 0.125]), 1000).tolist() == [0, 999, 125]  # 0.125·999 = 124.9
