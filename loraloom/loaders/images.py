"""Decoding images for training: every format Pillow reads, to RGB tensors cut to a bucket."""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from .files import atomic_write_bytes

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class DatasetError(ValueError):
    """A dataset that cannot be trained on; the message names the folder and the fix."""


def decode_image(path: str | Path, background: tuple[int, int, int] = (255, 255, 255),
                 cover: tuple[int, int] | None = None) -> Image.Image:
    """Any image Pillow reads as 8-bit RGB: EXIF rotation applied, transparency composited on ``background``,
    16-bit and 32-bit grey scaled (not clipped) to 8 bits, palette and CMYK converted. With ``cover`` (w, h)
    a JPEG may come out smaller, never below that size: libjpeg decodes at 1/2, 1/4 or 1/8 scale, 2-4x faster
    for the large photos of a booru dataset that are resized to about a megapixel anyway."""
    with Image.open(path) as im:
        if cover is not None and im.format == "JPEG":
            turned = im.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)  # stored sideways
            im.draft(im.mode, cover[::-1] if turned else cover)
        im.load()
        im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        wide = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or wide.max() > 255 else 255.0
        im = Image.fromarray(np.clip(wide / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return im.convert("RGB")


def load_crop(path: str | Path, resized: tuple[int, int], crop: tuple[int, int], bucket: tuple[int, int],
              flip: bool = False, background: tuple[int, int, int] = (255, 255, 255)) -> torch.Tensor:
    """(3, bucket_h, bucket_w) float32 in [-1, 1]: the image resized to ``resized`` (w, h), cut at ``crop``
    (left, top) to the ``bucket`` size (w, h), mirrored when ``flip``."""
    im = decode_image(path, background, cover=resized)
    if im.size != tuple(resized):
        im = im.resize(tuple(resized), Image.Resampling.LANCZOS, reducing_gap=3.0)
    left, top = crop
    im = im.crop((left, top, left + bucket[0], top + bucket[1]))
    if flip:
        im = ImageOps.mirror(im)
    return from_pil(im)


class CropDataset(torch.utils.data.Dataset):
    """Decodes and cuts images in DataLoader workers; item i is (i, pixels) or (i, None) for a bad file."""

    def __init__(self, specs: Sequence, background: tuple[int, int, int] = (255, 255, 255)):
        self.specs, self.background = list(specs), background  # objects with path, resized, crop, bucket, flip

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None]:
        s = self.specs[i]
        try:
            return i, load_crop(s.path, s.resized, s.crop, s.bucket, s.flip, self.background)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            return i, None  # counted and skipped by the caller, before training starts


def decode_batches(specs: Sequence, batch_size: int, workers: int,
                   background: tuple[int, int, int] = (255, 255, 255)
                   ) -> Iterator[tuple[list[int], torch.Tensor | None, list[int]]]:
    """(decoded positions, their pixels (B, 3, H, W), failed positions) in batches of one bucket each."""
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(specs):
        by_bucket.setdefault(tuple(s.bucket), []).append(i)
    batches = [ids[i:i + batch_size] for ids in by_bucket.values() for i in range(0, len(ids), batch_size)]
    loader = torch.utils.data.DataLoader(CropDataset(specs, background), batch_sampler=batches,
                                         num_workers=workers, collate_fn=_collate)
    yield from loader


def _collate(items: list[tuple[int, torch.Tensor | None]]) -> tuple[list[int], torch.Tensor | None, list[int]]:
    good = [(i, x) for i, x in items if x is not None]
    pixels = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], pixels, [i for i, x in items if x is None]


def from_pil(image: Image.Image) -> torch.Tensor:
    """An image → (3, H, W) float32 in [-1, 1], the range diffusers' VAEs expect."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] → an RGB image."""
    arr = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write ``image`` as a PNG atomically. Pillow writes no timestamp: same pixels, same bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
