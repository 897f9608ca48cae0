"""A tiny, self-made training set, autoencoder and base model for demos and tests that run offline on a CPU.

The concept is deliberately loud (a large red circle on a pale-yellow ground) so that a LoRA trained on it
is obvious beside the untouched model, even at 64 px with tiny models.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from PIL import Image, ImageDraw

from ..loaders.dataset import Geometry
from ..loaders.files import atomic_write_bytes
from ..loaders.images import from_pil, save_png
from .config import TrainConfig
from .families.base import Family

# Wording varies a little so the trigger word, not one fixed sentence, is what the captions share.
_CAPTION_TEMPLATES = (
    "{trigger}, a red circle on a yellow background",
    "{trigger}, a large red circle on a pale yellow background",
    "{trigger}, red circle, yellow background",
    "{trigger}, a bright red disc on a light yellow background",
    "a red circle on a yellow background, {trigger}",
)


def _shapes_image(rng: random.Random, size: int) -> Image.Image:
    """One dataset image: pale-yellow ground, one large red circle, position/size/shades jittered."""
    bg = (rng.randint(240, 255), rng.randint(228, 248), rng.randint(150, 190))
    red = (rng.randint(200, 240), rng.randint(0, 35), rng.randint(0, 35))
    radius = size * rng.uniform(0.25, 0.36)
    # The circle always stays fully inside the frame, so every image shows the whole concept.
    cx = rng.uniform(radius, size - radius)
    cy = rng.uniform(radius, size - radius)
    img = Image.new("RGB", (size, size), bg)
    ImageDraw.Draw(img).ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=red)
    return img


def write_shapes_dataset(folder: Path, count: int, size: int, seed: int, trigger: str) -> list[Path]:
    """Write ``count`` PNGs (``size``×``size``) with a same-stem ``.txt`` caption each; return the PNG paths.

    Same arguments → byte-identical files. Names are ``0000.png`` / ``0000.txt`` and so on.
    """
    if count < 0 or size < 8:
        raise ValueError(f"need count >= 0 and size >= 8, got count={count}, size={size}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)  # string-free integer seed: stable across Python versions and processes
    paths = []
    for i in range(count):
        img = _shapes_image(rng, size)
        caption = rng.choice(_CAPTION_TEMPLATES).format(trigger=trigger)
        png = save_png(img, folder / f"{i:04d}.png")
        atomic_write_bytes(png.with_suffix(".txt"), caption.encode("utf-8"))
        paths.append(png)
    return paths


def _random_shapes(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """``n`` images of one random-coloured circle or box on a random-coloured ground, (n, 3, size, size).

    They keep the decoder from learning only red and yellow, so an untrained model's other colours still
    decode to something recognisable.
    """
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    bg = torch.rand(n, 3, 1, 1, generator=g) * 2 - 1
    fg = torch.rand(n, 3, 1, 1, generator=g) * 2 - 1
    centre = torch.rand(n, 2, 1, 1, generator=g) * 0.8 + 0.1
    half = torch.rand(n, 2, 1, 1, generator=g) * 0.3 + 0.1
    dx = (xx - centre[:, 0]) / half[:, 0]
    dy = (yy - centre[:, 1]) / half[:, 1]
    is_circle = (torch.rand(n, 1, 1, generator=g) < 0.5)
    mask = torch.where(is_circle, dx**2 + dy**2 <= 1, (dx.abs() <= 1) & (dy.abs() <= 1))
    return torch.where(mask.unsqueeze(1), fg, bg)


def fit_autoencoder(vae: AutoencoderKL, images: list[Image.Image], steps: int, seed: int,
                    lr: float = 2e-3) -> list[float]:
    """Train ``vae`` in place (fp32, CPU) as a plain autoencoder on ``images``; return the per-step MSE.

    Each batch holds 4 dataset images (random flips) and 2 random other-colour shapes on random grounds.
    The loss is the reconstruction MSE of ``decode(encode(x).mode())``: no KL term, since a demo needs
    recognisable round trips, not a well-shaped prior (latents are not unit-scaled). ``images`` must be square
    and share one size. Same starting weights, images and seed → the same history and weights.
    """
    if not images:
        raise ValueError("fit_autoencoder needs at least one image")
    sizes = {img.size for img in images}
    if len(sizes) != 1:
        raise ValueError(f"all images must share one size, got {sorted(sizes)}")
    ((width, height),) = sizes
    if width != height:
        raise ValueError(f"images must be square, got {width}×{height}")
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in vae.parameters()):
        # Refuse rather than cast: casting a caller's model behind its back would surprise it.
        raise ValueError("fit_autoencoder trains an fp32 VAE on the CPU; pass one created that way")
    data = torch.stack([from_pil(img) for img in images])
    g = torch.Generator().manual_seed(seed)
    # Dataset-heavy mix: measured on the tiny demo VAE, 4+2 reaches the target error sooner per CPU second
    # than 4+4, while 2 random images per step still teach the decoder other colours and shapes.
    n_real, n_random = 4, 2
    vae.train()
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    # Short warm-up, then cosine decay to 10 %: the last steps refine instead of bouncing at full lr.
    warmup = max(1, steps // 20)

    def lr_factor(i: int) -> float:
        return min(1.0, (i + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * min(i, steps) / max(steps, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    losses: list[float] = []
    for _ in range(steps):
        real = data[torch.randint(len(data), (n_real,), generator=g)]
        flip_h = torch.rand(n_real, 1, 1, 1, generator=g) < 0.5
        real = torch.where(flip_h, real.flip(-1), real)
        flip_v = torch.rand(n_real, 1, 1, 1, generator=g) < 0.5
        real = torch.where(flip_v, real.flip(-2), real)
        x = torch.cat([real, _random_shapes(n_random, width, g)])
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
        loss = torch.nn.functional.mse_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    vae.eval()
    return losses


def pretrain_base(family: Family, denoiser: torch.nn.Module, vae: AutoencoderKL, text: dict[str, torch.Tensor],
                  steps: int, seed: int, size: int = 64, images: int = 512, batch_size: int = 8, lr: float = 1e-3
                  ) -> list[float]:
    """Train every weight of a random ``denoiser`` of ``family`` (fp32, CPU) on random shapes; return the losses.

    A random denoiser is no base model: its output layers are frozen noise that a LoRA on the blocks cannot
    undo (measured: after 600 demo steps the LoRA loss stayed above what predicting the mean image
    gives). A short pre-training with the family's own objective on circles and boxes of every colour, all
    under one caption's embeddings ``text`` (batched, batch 1), gives the demo a base that denoises but knows
    no red circle on yellow, which is what a LoRA on a real base looks like.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pixels = _random_shapes(images, size, g)
        latents = torch.cat([family.encode_images(vae, chunk) for chunk in pixels.split(64)])
    cond = {k: v.expand(batch_size, *v.shape[1:]) for k, v in text.items()}
    geometry = [Geometry((size, size), (0, 0), (size, size))] * batch_size
    train = family.resolve_train(TrainConfig(timesteps="sigmoid"))
    denoiser.requires_grad_(True).train()
    opt = torch.optim.AdamW(denoiser.parameters(), lr=lr, weight_decay=0.0)
    losses: list[float] = []
    for _ in range(steps):
        noised = family.noised(latents[torch.randint(images, (batch_size,), generator=g)], train, g)
        pred = family.predict(denoiser, noised.inputs, noised.t, cond, geometry, 1.0)
        loss = (pred - noised.target).square().flatten(1).mean(1).mul(noised.weights).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    denoiser.requires_grad_(False).eval()
    return losses
