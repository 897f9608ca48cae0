"""Config errors are one line naming the key or file; overrides and examples work."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from loraloom.training.cli import example_config
from loraloom.training.config import ConfigError, RunConfig, config_from_dict, load_config, to_toml


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("[train]\nstepz = 3\n", "unknown key 'train.stepz'"),
    ("[bogus]\nx = 1\n", "unknown key 'bogus'"),
    ("[train]\nsteps = 'many'\n", "train.steps must be an integer"),
    ("[train]\nsteps = 1.5\n", "train.steps must be an integer"),
    ("[adapter]\nrank = 0\n", "adapter.rank must be at least 1"),
    ("[optimizer]\nlr = -1e-4\n", "optimizer.lr must be positive"),
    ("[data]\nresolution = 500\n", "data.resolution = 500 must be a multiple of 16 for Flux"),
    ("[adapter]\ntargets = 'everything'\n", "adapter.targets = 'everything' is not one of"),
    ("[model]\nfamily = 'sd15'\n", "model.family = 'sd15' is not one of"),
    ("[output]\nname = '../escape'\n", "output.name must be a plain file name"),
    ("[train]\ngradient_checkpointing = 1\n", "train.gradient_checkpointing must be true or false"),
    ("[optimizer]\nbetas = [0.9]\n", "optimizer.betas must have 2 items"),
    ("[train\n", "not valid TOML"),
])
def test_bad_values_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text), check_paths=False)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(tmp_path / "run.toml") in str(e.value)


def test_missing_file_names_key_and_path(tmp_path):
    with pytest.raises(ConfigError, match=r"model.diffusion_model: .*nothere.safetensors does not exist"):
        load_config(write(tmp_path, "[model]\ntransformer = 'nothere.safetensors'\n"))
    with pytest.raises(ConfigError, match=r"model\.diffusion_model is empty"):
        load_config(write(tmp_path, "[train]\nsteps = 2\n"))


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    cfg = load_config(write(tmp_path, "[model]\nvae = 'models/ae.safetensors'\n"), check_paths=False)
    assert cfg.model.vae == str(tmp_path / "models" / "ae.safetensors")
    assert cfg.output.run_dir == str(tmp_path / "runs" / "run")


def test_overrides_use_toml_values(tmp_path):
    cfg = load_config(write(tmp_path, "[train]\nsteps = 3\n"),
                      ["train.steps=10", "optimizer.lr=2e-4", "data.trigger=ohwx", "optimizer.betas=[0.9, 0.95]",
                       "train.gradient_checkpointing=false"], check_paths=False)
    assert cfg.train.steps == 10 and math.isclose(cfg.optimizer.lr, 2e-4) and cfg.data.trigger == "ohwx"
    assert cfg.optimizer.betas == (0.9, 0.95) and cfg.train.gradient_checkpointing is False
    with pytest.raises(ConfigError, match=r"unknown key 'train\.nope'"):
        load_config(write(tmp_path, ""), ["train.nope=1"], check_paths=False)


def test_toml_round_trip_of_defaults_and_examples():
    import tomllib

    for cfg in (config_from_dict(RunConfig().to_dict()), example_config("flux")):
        assert config_from_dict(tomllib.loads(to_toml(cfg))) == cfg  # what is written reads back the same
        assert cfg.train.timesteps != "auto" and cfg.model.text_length > 0  # the family resolved "auto"


def test_example_config_is_documented_and_valid(tmp_path):
    text = to_toml(example_config("flux"))
    assert "# The diffusion model" in text and "guidance = 1.0" in text
    cfg = load_config(write(tmp_path, text), check_paths=False)
    assert cfg.model.diffusion_model.endswith("flux1-dev2pro-fp8.safetensors") and cfg.train.guidance == 1.0
