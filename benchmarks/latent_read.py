"""Per-step cost of reading cached latents: one safetensors file per image, read as the session reads a batch.

Writes ``--files`` Flux latents at 1024 px (16 x 128 x 128) through ``EncoderCache``, in bf16 and in fp32, and
for comparison Flux text embeddings (T5 512 x 4096 + CLIP pooled 768, bf16), then times ``get_many`` on
batches of ``--batch`` random keys, stacked as a step stacks them: from the page cache (warm: a dataset that
fits in memory, or read again), and after ``posix_fadvise(DONTNEED)`` dropped those files from it (cold: from
disk).

    python benchmarks/latent_read.py --files 256 --batch 4 --folder /tmp/loraloom-latents
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from loraloom.loaders.cache import EncoderCache


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def batch_times(cache: EncoderCache, keys: list[str], batch: int, rounds: int, cold: bool) -> list[float]:
    rng, times = random.Random(0), []
    for _ in range(rounds):
        picked = rng.sample(keys, batch)
        if cold:
            for key in picked:
                evict(cache.path(key))
        start = time.perf_counter()
        entries = cache.get_many(picked, lambda missing: [])
        for name in entries[0]:  # stacked as the step does: safetensors maps the file, this reads it
            torch.stack([e[name] for e in entries])
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/loraloom-latents"))
    parser.add_argument("--smoke", action="store_true", help="8 files, 3 rounds: checks that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.files, args.batch, args.rounds = 8, 2, 3
        args.folder = Path(tempfile.mkdtemp(prefix="loraloom-latents-"))
    torch.set_num_threads(1)
    entries = {"latent bf16": lambda: {"latent": torch.randn(16, 128, 128).bfloat16()},
               "latent fp32": lambda: {"latent": torch.randn(16, 128, 128)},
               "text bf16": lambda: {"t5": torch.randn(512, 4096).bfloat16(), "pooled": torch.randn(768).bfloat16()}}
    for name, entry in entries.items():
        cache = EncoderCache(args.folder, "bench", name.replace(" ", "-"))
        keys = [f"{i:064x}" for i in range(args.files)]
        for i in cache.missing(keys):
            cache.put(keys[i], entry())
        size = cache.path(keys[0]).stat().st_size / 2**20
        for cold in (False, True):
            times = batch_times(cache, keys, args.batch, args.rounds, cold)
            print(f"{name} ({size:.2f} MB a file), {'cold' if cold else 'warm'}: median "
                  f"{statistics.median(times) * 1e3:.2f} ms per batch of {args.batch}, max {max(times) * 1e3:.2f} ms")

if __name__ == "__main__":
    main()
