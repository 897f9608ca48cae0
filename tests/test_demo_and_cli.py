"""The demo (reduced) shows a LoRA that moves samples towards the training data; the CLI drives the engine."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loraloom.training import demo
from loraloom.training.cli import main
from loraloom.training.metrics import read_metrics


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    demo.prepare(folder, images=8, steps=100, vae_steps=60, base_steps=150)
    return folder, demo.run(folder)


def test_demo_writes_its_results_and_learns(demo_run):
    _, result = demo_run
    for key in ("adapter", "comparison", "loss_chart", "metrics"):
        assert result[key].exists(), key
    assert result["val_loss_after"] < 0.95 * result["val_loss_before"]
    comparison = Image.open(result["comparison"])
    assert comparison.width > 2 * 192 and comparison.height > 3 * 192  # 2 columns, 3 seeds
    steps = [r["step"] for r in read_metrics(result["metrics"].parent) if r["type"] == "step"]
    assert steps == list(range(1, 101))


def test_demo_lora_moves_the_samples_towards_the_training_data(demo_run):
    folder, _ = demo_run
    from loraloom.training.config import load_config
    from loraloom.training.session import Session

    def mean_colour(image: Image.Image) -> np.ndarray:
        return np.asarray(image.convert("RGB"), dtype=np.float64).mean(axis=(0, 1))

    data = np.mean([mean_colour(Image.open(p)) for p in sorted((folder / "images").glob("*.png"))], axis=0)
    session = Session.open(load_config(folder / demo.CONFIG_NAME))  # resumes the finished run
    for seed in (0, 1):
        base = session.sample(demo.PROMPT, seed, adapter=False)
        lora = session.sample(demo.PROMPT, seed, adapter=True)
        difference = np.abs(np.asarray(base, dtype=np.float64) - np.asarray(lora, dtype=np.float64)).mean()
        assert difference > 5  # of 255: visibly different pictures from the same noise
        # ...and different towards the data: the mean colour comes closer to the dataset's (red on yellow).
        base_gap, lora_gap = (np.linalg.norm(mean_colour(im) - data) for im in (base, lora))
        assert lora_gap < 0.9 * base_gap, (seed, base_gap, lora_gap)


def test_cli_prepare_then_train_then_resume(tmp_path, capsys):
    assert main(["demo", "--prepare", str(tmp_path), "--steps", "4", "--vae-steps", "5", "--base-steps", "5"]) == 0
    config = tmp_path / demo.CONFIG_NAME
    assert main(["train", str(config), "--set", "train.steps=2", "--set", "train.validate_every=0"]) == 0
    out = capsys.readouterr().out
    assert "step 2" in out and "adapter:" in out
    # Running the same command with more steps continues from the checkpoint of step 2.
    assert main(["train", str(config), "--set", "train.steps=3", "--set", "train.validate_every=0"]) == 0
    out = capsys.readouterr().out
    assert "step=2" in out and "[resume]" in out and "step 3" in out
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if r["type"] == "step"]
    assert steps == [1, 2, 3]


def test_cli_reports_config_errors_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[adapter]\nrank = 0\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "adapter.rank must be at least 1" in err and "\n" not in err


def test_cli_prints_a_valid_example(capsys, tmp_path):
    assert main(["config", "--example", "flux"]) == 0
    path = tmp_path / "example.toml"
    path.write_text(capsys.readouterr().out)
    from loraloom.training.config import load_config
    assert load_config(path, check_paths=False).model.family == "flux"


def test_cli_prints_the_sdxl_example_with_kohaku_xls_recipe(capsys, tmp_path):
    assert main(["config", "--example", "sdxl"]) == 0
    path = tmp_path / "example.toml"
    path.write_text(capsys.readouterr().out)
    from loraloom.training.config import load_config
    cfg = load_config(path, check_paths=False)
    assert cfg.model.family == "sdxl" and cfg.model.prediction == "epsilon"  # no v_pred key: the file is absent
    assert (cfg.data.resolution, cfg.data.buckets.enabled, cfg.data.buckets.min_side, cfg.data.buckets.max_side) == (
        1024, True, 256, 4096)
    assert (cfg.train.min_snr_gamma, cfg.train.noise_offset) == (5.0, 0.0357)
    o = cfg.optimizer
    assert (o.name, o.lr, o.text_encoder_lr, o.betas, o.weight_decay) == ("lion8bit", 2e-5, 5e-6, (0.9, 0.95), 0.1)
    assert cfg.data.captions.format == "tags" and cfg.data.captions.tag_dropout == 0.15


def test_sdxl_demo_lowers_the_held_out_validation_loss(tmp_path, capsys):
    """Memorisation on the tiny SDXL: a LoRA trained on the red circles lowers the loss on held-out ones."""
    assert main(["demo", "--family", "sdxl", "--out", str(tmp_path), "--steps", "100", "--vae-steps", "60",
                 "--base-steps", "150"]) == 0
    before, after = map(float, re.search(r"validation loss ([\d.]+) -> ([\d.]+)", capsys.readouterr().out).groups())
    assert after < 0.9 * before


def test_the_cli_says_nothing_about_kernels_it_does_not_download(tmp_path):
    """A user's first command prints what it did, not bitsandbytes' offline kernel lookup (on CPUs where
    bitsandbytes tries one); in a fresh interpreter, where the demo's imports would load bitsandbytes first."""
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "loraloom.training.cli", "demo", "--prepare", str(tmp_path),
                           "--steps", "2", "--vae-steps", "2", "--base-steps", "2"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "gemm_4bit_forward" not in done.stderr and "publisher trust" not in done.stderr, done.stderr[-3000:]
