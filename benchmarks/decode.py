"""Decoding for the latent cache: large JPEGs cut to a ~1024² bucket, with and without libjpeg's reduced scale.

Writes N photo-like JPEGs (smooth colour fields plus grain, 4:2:0, quality 92) at the size given, then on one
core times ``load_crop`` (which lets libjpeg decode at 1/2..1/8 scale while that still covers the resized
size) against decoding every pixel and resizing the same way, and reports the mean pixel difference.

    python benchmarks/decode.py --count 40 --size 4000x3000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from loraloom.loaders.buckets import BucketSettings, assign_buckets, center_crops, resized_size
from loraloom.loaders.images import decode_image, from_pil, load_crop


def write_photos(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i:04d}-{size[0]}x{size[1]}.jpg"
        if not path.exists():
            field = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
            grain = rng.normal(0, 6, (size[1], size[0], 3))
            pixels = np.clip(np.asarray(field, np.float32) + grain, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(path, quality=92)
        paths.append(path)
    return paths


def full_decode(path: Path, resized, crop, bucket) -> torch.Tensor:
    im = decode_image(path).resize(tuple(resized), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return from_pil(im.crop((crop[0], crop[1], crop[0] + bucket[0], crop[1] + bucket[1])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--size", default="4000x3000")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/loraloom-decode"))
    parser.add_argument("--smoke", action="store_true", help="two 1200x900 JPEGs: checks that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.count, args.size, args.folder = 2, "1200x900", Path(tempfile.mkdtemp(prefix="loraloom-decode-"))
    torch.set_num_threads(1)
    size = tuple(int(v) for v in args.size.split("x"))
    paths = write_photos(args.folder, args.count, size)
    w, h = np.array([size[0]]), np.array([size[1]])
    bucket = assign_buckets(w, h, 1024, 16, BucketSettings(enabled=True))
    resized, crop = resized_size(w, h, bucket)[0].tolist(), center_crops(w, h, bucket)[0].tolist()
    bucket = bucket[0].tolist()
    timings, outputs = {}, {}
    for name, fn in (("full", full_decode), ("reduced", load_crop), ("full again", full_decode)):
        start = time.process_time()
        outputs[name] = [fn(p, resized, crop, bucket) for p in paths]
        timings[name] = (time.process_time() - start) / len(paths)
    full = min(timings["full"], timings["full again"])
    diff = torch.stack([(a - b).abs().mean() for a, b in zip(outputs["reduced"], outputs["full"])]).mean() * 127.5
    print(f"{args.count} JPEGs {size[0]}x{size[1]} -> resized {resized[0]}x{resized[1]}, bucket {bucket[0]}x"
          f"{bucket[1]}, one core: full decode {full * 1000:.0f} ms, reduced scale {timings['reduced'] * 1000:.0f} "
          f"ms per image ({full / timings['reduced']:.2f}x); mean difference {float(diff):.2f} of 255 levels")


if __name__ == "__main__":
    main()
