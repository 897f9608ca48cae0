"""The embedded demo: a LoRA on a tiny model of a family learns a red circle on yellow, on CPU.

``prepare`` writes everything a real run has (model files in the user layouts, an image folder with
captions, a TOML config); ``run`` trains it through the same ``Session`` as any other config.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from PIL import Image

from ..loaders.files import atomic_write_bytes
from ..loaders.images import from_pil, save_png
from .config import MODEL_FILES, RunConfig, config_from_dict, load_config, to_toml
from .demo_data import fit_autoencoder, pretrain_base, write_shapes_dataset
from .families import DEFAULT_FAMILY, family
from .metrics import read_metrics
from .preview import loss_chart
from .session import Session

TRIGGER = "zwx"
PROMPT = f"{TRIGGER}, a red circle on a yellow background"
BASE_CAPTION = "a shape"  # the demo base's only caption: it learns shapes of every colour, no trigger
CONFIG_NAME = "demo.toml"
MODELS = "models"  # the prepared folder's model files


def demo_config(files: dict[str, str], family_name: str = DEFAULT_FAMILY, steps: int = 1200) -> RunConfig:
    """The demo's settings over model ``files`` (by ModelConfig slot); relative paths are relative to the
    prepared folder."""
    return config_from_dict({
        "model": {"family": family_name, **files, "text_length": 32},
        "data": dict(images="images", resolution=64, validation_images=2, cache_dir="cache"),
        "adapter": dict(rank=32, alpha=32.0, targets="all_linear"),
        "optimizer": dict(lr=3e-3, warmup_steps=10, scheduler="constant_with_warmup"),
        "train": dict(steps=steps, batch_size=4, mixed_precision="fp32", gradient_checkpointing=False,
                      timesteps="sigmoid", checkpoint_every=200, validate_every=50, log_every=1),
        "sample": dict(prompts=[PROMPT], seeds=[0, 1, 2], steps=20, guidance=1.0),
        "output": dict(run_dir="run", name="demo-lora"),
    })


def prepare(folder: str | Path, images: int = 16, steps: int = 1200, vae_steps: int = 300, base_steps: int = 600,
            seed: int = 0, family_name: str = DEFAULT_FAMILY) -> Path:
    """Write the demo's models, dataset and config into ``folder``; returns the config path."""
    folder, kit = Path(folder), family(family_name)
    paths = write_shapes_dataset(folder / "images", count=images, size=64, seed=seed, trigger=TRIGGER)
    tiny = kit.tiny(seed=seed, words=(TRIGGER, "disc"))
    # A random VAE decodes everything to noise: fit it as an autoencoder so pictures are legible.
    pictures = [Image.open(p).convert("RGB") for p in paths]
    fit_autoencoder(tiny.vae, pictures, steps=vae_steps, seed=seed)
    match_latent_scale(tiny.vae, pictures, kit.latent_scale)
    with torch.no_grad():
        base_text = kit.encode_text(tiny.text, [BASE_CAPTION])
    pretrain_base(kit, tiny.denoiser, tiny.vae, base_text, steps=base_steps, seed=seed)
    written = kit.write_tiny(tiny, folder / MODELS)
    files = {slot: str(path.relative_to(folder)) for slot, path in written.items() if slot in MODEL_FILES}
    config_path = folder / CONFIG_NAME
    atomic_write_bytes(config_path, to_toml(demo_config(files, family_name, steps)).encode())
    return config_path


@torch.no_grad()
def match_latent_scale(vae: AutoencoderKL, images: list[Image.Image], latent_scale: float) -> float:
    """Rescale a fitted VAE's latents so the family's latent format gives them unit spread, as with a real VAE.

    Without it the diffusion model sees a signal of std ~0.36 (a latent scale of 0.36) against unit noise and its errors
    are amplified ~2.8x on decoding. A pure scale folds exactly into the encoder's last and the decoder's first
    convolution (zero padding stays zero). Returns the factor.
    """
    pixels = torch.stack([from_pil(im) for im in images])
    z = vae.encode(pixels).latent_dist.mode()
    factor = 1.0 / (latent_scale * z.std().item())
    c = vae.config.latent_channels
    vae.encoder.conv_out.weight[:c] *= factor  # the mean half of the posterior
    vae.encoder.conv_out.bias[:c] *= factor
    vae.encoder.conv_out.bias[c:] += 2 * math.log(factor)  # log-variance follows the scale
    vae.decoder.conv_in.weight /= factor
    return factor


def run(folder: str | Path, steps: int | None = None, **prepare_args) -> dict:
    """Prepare (if needed) and train the demo; returns the paths of its results and its timings."""
    folder = Path(folder)
    start = time.perf_counter()
    config_path = folder / CONFIG_NAME
    if not config_path.exists():
        prepare(folder, **prepare_args)
    prepared = time.perf_counter()
    overrides = [f"train.steps={steps}"] if steps else []
    session = Session.open(load_config(config_path, overrides))
    first_val = session.validate()
    adapter = session.run()
    last_val = session.validate()
    comparison = session.preview()
    records = read_metrics(session.run_dir)
    train = [r for r in records if r["type"] == "step"]
    val = [r for r in records if r["type"] == "validation"]
    chart = loss_chart([r["step"] for r in train], [r["loss"] for r in train],
                       [r["step"] for r in val], [r["val_loss"] for r in val])
    chart_path = save_png(chart, session.run_dir / "loss.png")
    return {"adapter": adapter, "comparison": comparison, "loss_chart": chart_path,
            "metrics": session.metrics.path, "val_loss_before": first_val, "val_loss_after": last_val,
            "prepare_seconds": prepared - start, "train_seconds": time.perf_counter() - prepared}
