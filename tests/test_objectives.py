"""Timestep sampling and the flow-matching objective."""

from __future__ import annotations

import math

import pytest
import torch

from loraloom.training.objectives import (
    auto_shift,
    flow_match_inputs,
    inference_sigmas,
    sample_timesteps,
    shift_timesteps,
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
