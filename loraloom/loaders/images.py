"""An image folder with a caption file beside each image (the layout every trainer reads)."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .files import atomic_write_bytes

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class DatasetError(ValueError):
    """A dataset that cannot be trained on; the message names the folder and the fix."""


@dataclass(frozen=True)
class Sample:
    path: Path
    caption: str
    content_hash: str  # sha256 of the image bytes: the cache key, independent of the file name


@dataclass(frozen=True)
class FolderIndex:
    samples: list[Sample]
    skipped: dict[str, int]  # reason -> count


def index_folder(folder: str | Path, caption_extension: str = ".txt", trigger: str = "") -> FolderIndex:
    """Every readable image under ``folder`` (recursive, sorted) with its caption.

    Unreadable images and non-UTF-8 captions are skipped and counted; a missing caption is an empty one.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: dataset folder not found; set data.images to a folder of images")
    samples, skipped = [], {}
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            data = path.read_bytes()
            with Image.open(path) as im:
                im.verify()
        except (OSError, UnidentifiedImageError, SyntaxError):
            skipped["unreadable image"] = skipped.get("unreadable image", 0) + 1
            continue
        cap_path = path.with_suffix(caption_extension)
        try:
            caption = cap_path.read_text(encoding="utf-8").strip() if cap_path.exists() else ""
        except UnicodeDecodeError:
            skipped["caption not UTF-8"] = skipped.get("caption not UTF-8", 0) + 1
            continue
        if trigger and trigger not in caption:
            caption = f"{trigger}, {caption}" if caption else trigger
        samples.append(Sample(path, caption, hashlib.sha256(data).hexdigest()))
    if not samples:
        raise DatasetError(f"{folder}: no usable images (supported: {', '.join(sorted(IMAGE_SUFFIXES))}; "
                           f"skipped: {skipped or 'none found'})")
    return FolderIndex(samples, skipped)


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """An image as (3, R, R) float32 in [-1, 1]: EXIF-rotated, RGB, resized and centre-cropped."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        im = ImageOps.fit(im, (resolution, resolution), Image.Resampling.LANCZOS)
    return from_pil(im)


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
