"""Aspect-ratio buckets: sizes around a target pixel area, the bucket of each image, and its crop.

Sizes are multiples of the family's ``divisor`` (Flux: 16 = VAE factor 8 x patch 2), so every bucket packs
into whole tokens. All functions work on whole arrays: a million images are assigned in well under a second.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class BucketSettings:
    enabled: bool = field(default=False, metadata={"doc": (
        "Aspect-ratio buckets around data.resolution² pixels. Off: every image is centre-cropped to a square.")})
    min_side: int = field(default=0, metadata={"doc": (
        "Smallest bucket side in pixels; smaller images are skipped. 0: resolution / 4 (256 at 1024).")})
    max_side: int = field(default=0, metadata={"doc": "Largest bucket side in pixels. 0: resolution x 4."})
    no_upscale: bool = field(default=False, metadata={"doc": (
        "Never enlarge: an image smaller than the target area gets a bucket of its own size (rounded down).")})
    crop: Literal["center", "random"] = field(default="center", metadata={"doc": (
        "Where to cut the part that does not fit the bucket; the crop is recorded per image.")})
    flip: bool = field(default=False, metadata={"doc": (
        "Mirror images at random per epoch (both versions are cached: twice the latent cache).")})

    def limits(self, resolution: int, divisor: int) -> tuple[int, int]:
        low = self.min_side or resolution // 4
        high = self.max_side or resolution * 4
        return max(divisor, low // divisor * divisor), max(divisor, high // divisor * divisor)


def bucket_sizes(resolution: int, divisor: int, min_side: int, max_side: int) -> np.ndarray:
    """(K, 2) int array of (width, height), sorted by aspect ratio: each width from min to max side with the
    height that brings the area nearest to ``resolution``² (rounded to ``divisor``)."""
    area = resolution * resolution
    widths = np.arange(min_side, max_side + 1, divisor)
    heights = np.round(area / widths / divisor).astype(np.int64) * divisor
    keep = (heights >= min_side) & (heights <= max_side)
    sizes = np.unique(np.stack([widths[keep], heights[keep]], axis=1), axis=0)
    return sizes[np.argsort(sizes[:, 0] / sizes[:, 1], kind="stable")]


def assign_buckets(widths: np.ndarray, heights: np.ndarray, resolution: int, divisor: int,
                   settings: BucketSettings) -> np.ndarray:
    """(N, 2) bucket (width, height) per image: the nearest aspect ratio (in log space) among the buckets;
    with ``no_upscale``, images under the target area keep their own size, rounded down to ``divisor``."""
    widths, heights = np.asarray(widths, np.int64), np.asarray(heights, np.int64)
    if not settings.enabled:
        return np.tile(np.array([[resolution, resolution]]), (len(widths), 1))
    low, high = settings.limits(resolution, divisor)
    sizes = bucket_sizes(resolution, divisor, low, high)
    log_ratios = np.log(sizes[:, 0] / sizes[:, 1])
    wanted = np.log(widths / heights)
    right = np.clip(np.searchsorted(log_ratios, wanted), 1, len(sizes) - 1)
    left = right - 1
    nearest = np.where(np.abs(wanted - log_ratios[left]) <= np.abs(wanted - log_ratios[right]), left, right)
    out = sizes[nearest] if len(sizes) > 1 else np.tile(sizes, (len(widths), 1))
    if settings.no_upscale:
        small = widths * heights < resolution * resolution
        own = np.stack([widths // divisor * divisor, heights // divisor * divisor], axis=1)
        fits = (own >= low).all(axis=1)
        out = np.where((small & fits)[:, None], np.minimum(own, high), out)
    return out


def center_crops(widths: np.ndarray, heights: np.ndarray, buckets: np.ndarray) -> np.ndarray:
    """(N, 2) (left, top) of the centred crop in the image resized to cover its bucket (:func:`resized_size`)."""
    return (resized_size(widths, heights, buckets) - buckets) // 2


def random_crops(widths: np.ndarray, heights: np.ndarray, buckets: np.ndarray, keys: Sequence[str],
                 seed: int) -> np.ndarray:
    """(N, 2) (left, top) of a random crop, drawn from each image's ``keys`` entry (its content key) and
    ``seed``, not from its position: adding or removing images moves no other image's crop, whose cached latent
    stays valid."""
    spare = resized_size(widths, heights, buckets) - buckets
    digests = b"".join(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=16).digest() for key in keys)
    draw = np.frombuffer(digests, np.uint64).reshape(-1, 2) / 2.0 ** 64
    return np.minimum(np.floor(draw * (spare + 1)).astype(np.int64), spare)  # float rounding can reach 1.0


def resized_size(widths: np.ndarray, heights: np.ndarray, buckets: np.ndarray) -> np.ndarray:
    """(N, 2) size of each image scaled (aspect kept) to the smallest size that covers its bucket."""
    widths, heights = np.asarray(widths, np.float64), np.asarray(heights, np.float64)
    scale = np.maximum(buckets[:, 0] / widths, buckets[:, 1] / heights)
    size = np.stack([np.round(widths * scale), np.round(heights * scale)], axis=1).astype(np.int64)
    return np.maximum(size, buckets)
