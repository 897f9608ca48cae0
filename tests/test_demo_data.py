"""The demo dataset is reproducible byte for byte, and the demo VAE fit learns, deterministically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from loraloom.training.demo_data import fit_autoencoder, write_shapes_dataset


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    a = write_shapes_dataset(tmp_path / "a", count=5, size=64, seed=3, trigger="zwx")
    write_shapes_dataset(tmp_path / "b", count=5, size=64, seed=3, trigger="zwx")
    write_shapes_dataset(tmp_path / "c", count=5, size=64, seed=4, trigger="zwx")
    assert [p.name for p in a] == [f"{i:04d}.png" for i in range(5)]
    files_a, files_b, files_c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert sorted(files_a) == sorted(f"{i:04d}.{ext}" for i in range(5) for ext in ("png", "txt"))
    assert files_a == files_b
    assert sorted(files_c) == sorted(files_a)
    assert all(files_a[name] != files_c[name] for name in files_a if name.endswith(".png"))


def test_images_show_the_concept_and_captions_name_the_trigger(tmp_path):
    paths = write_shapes_dataset(tmp_path, count=6, size=48, seed=0, trigger="zwx")
    for png in paths:
        with Image.open(png) as img:
            assert img.size == (48, 48) and img.mode == "RGB"
            px = np.asarray(img).reshape(-1, 3).astype(int)
        red = (px[:, 0] > 180) & (px[:, 1] < 60) & (px[:, 2] < 60)
        yellow = (px[:, 0] > 230) & (px[:, 1] > 220) & (px[:, 2] > 140) & (px[:, 2] < 200)
        assert red.mean() > 0.15 and yellow.mean() > 0.3 and (red | yellow).all()
        caption = png.with_suffix(".txt").read_text(encoding="utf-8")
        assert "zwx" in caption and ("red circle" in caption or "red disc" in caption)
    # No temporary files are left behind by the atomic writes.
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".png"] * 6 + [".txt"] * 6


def _tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32, 32),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         layers_per_block=1, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False)


@pytest.fixture(scope="module")
def small_images(tmp_path_factory) -> list[Image.Image]:
    # 32 px keeps this test to a few seconds; the 64 px demo size is measured in the report, not here.
    paths = write_shapes_dataset(tmp_path_factory.mktemp("vae"), count=4, size=32, seed=0, trigger="zwx")
    return [Image.open(p).convert("RGB") for p in paths]


def _recon_error(vae: AutoencoderKL, images: list[Image.Image]) -> float:
    x = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
                     for im in images])
    with torch.no_grad():
        return (vae.decode(vae.encode(x).latent_dist.mode()).sample - x).abs().mean().item()


def test_fit_autoencoder_lowers_the_loss_and_is_deterministic(small_images):
    first, second = _tiny_vae(), _tiny_vae()
    before = _recon_error(first, small_images)
    losses = fit_autoencoder(first, small_images, steps=60, seed=1)
    again = fit_autoencoder(second, small_images, steps=60, seed=1)
    assert len(losses) == 60
    # Per-step losses are noisy (random shapes in every batch): compare averages, and a fixed evaluation.
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5]), losses
    assert _recon_error(first, small_images) < 0.5 * before
    assert losses == again
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert not first.training  # handed back ready for inference
    other = fit_autoencoder(_tiny_vae(), small_images, steps=3, seed=2)
    assert other != losses[:3]


def test_fit_autoencoder_rejects_mixed_sizes(small_images):
    with pytest.raises(ValueError, match="one size"):
        fit_autoencoder(_tiny_vae(), [*small_images, Image.new("RGB", (16, 16))], steps=1, seed=0)
