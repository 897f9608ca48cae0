"""Moving average of the trained weights ([ema]): it follows its definition for any algorithm, is checkpointed
(resume is exact), exports through the same code as the live weights and shows in previews."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from loraloom.training.config import ConfigError, ModelConfig
from loraloom.training.export import adapter_file_state, companion
from loraloom.training.families import family
from loraloom.training.session import Session

FLUX = family("flux")


def test_the_average_follows_its_definition(make_config):
    """s ← s + (1 − d_n)(p − s) at every 2nd step, d_n = min(0.8, (1 + n) / (10 + n)), from the starting weights."""
    session = Session.open(make_config(train={"steps": 6}, ema={"decay": 0.8, "every": 2}))
    expected = [p.detach().clone() for p in session.params]
    for step in range(1, 7):
        session.step(1)
        if step % 2 == 0:
            n = step // 2 - 1
            d = min(0.8, (1 + n) / (10 + n))
            expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, session.params)]
    assert max((a - b).abs().max().item() for a, b in zip(session.ema.shadow, expected)) <= 1e-6
    assert any(not torch.equal(a, p) for a, p in zip(session.ema.shadow, session.params))  # lags the weights


def test_without_warmup_the_decay_is_constant(make_config):
    session = Session.open(make_config(train={"steps": 2}, ema={"decay": 0.5, "warmup": False}))
    start = [p.detach().clone() for p in session.params]
    session.step(1)
    expected = [0.5 * s + 0.5 * p.detach() for s, p in zip(start, session.params)]
    assert max((a - b).abs().max().item() for a, b in zip(session.ema.shadow, expected)) <= 1e-7


def test_resume_restores_the_average_exactly(make_config):
    run = {"train": {"steps": 4, "checkpoint_every": 2}, "ema": {"decay": 0.9, "on_cpu": True}}
    straight = Session.open(make_config("straight", **run))
    straight.run()
    first = Session.open(make_config("resumed", **run))
    first.step(2)
    del first  # a crash after the checkpoint of step 2
    with pytest.raises(ConfigError, match=r"ema\.decay changed from 0\.9 to 0\.5 since the checkpoint"):
        Session.open(make_config("resumed", **{**run, "ema": {"decay": 0.5, "on_cpu": True}}))
    # Whether previews show the average does not change what is trained: it may change on resume.
    resumed = Session.open(make_config("resumed", **{**run, "ema": {**run["ema"], "preview": False}}))
    assert resumed.state.step == 2 and all(s.device.type == "cpu" for s in resumed.ema.shadow)
    resumed.run()
    assert all(torch.equal(a, b) for a, b in zip(straight.ema.shadow, resumed.ema.shadow))
    a, b = straight.adapter.state(), resumed.adapter.state()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_average_exports_beside_the_weights_and_previews_in_its_own_column(make_config):
    session = Session.open(make_config(train={"steps": 3}, ema={"decay": 0.9},
                                       sample={"prompts": ["zwx, a red disc"], "steps": 2}))
    session.run()
    live = [p.detach().clone() for p in session.params]
    path = session.export(dtype="fp32")
    ema_file = load_file(companion(path, "ema"))
    with session.ema.applied(session.params):
        expected = adapter_file_state(session.adapter.export(), FLUX, torch.float32)
        x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
        text = {k: v[None] for k, v in session.val_items[0].text.items()}
        with_average = session.predict(x, torch.tensor([0.5]), text, 1.0)
    assert ema_file.keys() == expected.keys() and all(torch.equal(ema_file[k], expected[k]) for k in expected)
    assert all(torch.equal(a, b) for a, b in zip(live, session.params))  # the live weights are back
    assert not all(torch.equal(ema_file[k], v) for k, v in load_file(path).items())
    assert torch.equal(session.predict(x, torch.tensor([0.5]), text, 1.0, ema=True), with_average)

    three = Image.open(session.preview())
    session.cfg = replace(session.cfg, ema=replace(session.cfg.ema, preview=False))
    two = Image.open(session.preview())
    assert three.height == two.height and three.width > two.width * 1.3  # base | trained | EMA
    prompt = session.cfg.sample.prompts[0]
    assert session.sample(prompt, 0, ema=True).tobytes() != session.sample(prompt, 0).tobytes()


def test_a_full_fine_tune_exports_its_averaged_model(make_config):
    session = Session.open(make_config(adapter={"algorithm": "full"}, train={"steps": 2}, ema={"decay": 0.7}))
    session.run()
    path = session.export(dtype="fp32")
    model = FLUX.load_denoiser(ModelConfig(diffusion_model=str(companion(companion(path, "ema"), "model"))),
                               torch.float32, keep_float8=False)
    state = model.state_dict()
    names = list(session.adapter.trained_weights())
    assert len(names) == len(session.ema.shadow)
    for name, average in zip(names, session.ema.shadow):
        assert torch.equal(state[name.split(".", 1)[1]], average)
    assert load_file(companion(path, "ema")).keys() == load_file(path).keys()


def test_bad_settings_name_the_key(make_config):
    with pytest.raises(ConfigError, match=r"ema\.decay must be in \[0, 1\) \(0: no moving average\)"):
        make_config(ema={"decay": 1.0})
    with pytest.raises(ConfigError, match=r"ema\.every must be at least 1"):
        make_config(ema={"decay": 0.9, "every": 0})
    session = Session.open(make_config(train={"steps": 1}))
    assert session.ema is None
    with pytest.raises(ConfigError, match=r"there is no moving average to use: set ema\.decay"):
        session.sample("zwx", 0, ema=True)
