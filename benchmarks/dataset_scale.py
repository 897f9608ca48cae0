"""Dataset index at Kohaku scale: index N booru metadata records, bucket them, process captions.

Generates N danbooru2023-style records (tags drawn from a 20k-tag vocabulary, sizes, ratings, fav counts,
dates, md5) into a Parquet file, then, each in a fresh process so peak memory is that step's alone:

1. cold start: read the metadata, build Kohaku captions (quality percentiles within each rating), assign
   buckets (1024² area, 256..4096, divisor 16), write the cached index;
2. warm start: the same call with the index cached;
3. caption throughput on one core of the Kohaku chain (underscores, escaping, dedupe, shuffle with kept
   sections, 15% tag dropout): per step (``captions_at`` on the prepared captions, in training order), the
   one-off fixed part done at index build, and the whole chain from the text; one epoch plan of the sampler.

    python benchmarks/dataset_scale.py --records 1000000 --folder /tmp/loraloom-scale
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def generate(path: Path, count: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    vocab = np.array([f"tag_{i}" + "_x" * (i % 3) for i in range(20_000)] + ["^_^", "name_(series)"])
    chunk = 100_000
    writer = None
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        general = [" ".join(["1girl", *rng.choice(vocab, rng.integers(15, 40))]) for _ in range(n)]
        table = pa.table({
            "path": [f"images/{i:08d}.webp" for i in range(start, start + n)],
            "md5": [f"{i:032x}" for i in range(start, start + n)],
            "image_width": rng.integers(400, 4000, n), "image_height": rng.integers(400, 4000, n),
            "tag_string_general": general,
            "tag_string_character": [f"character_{i % 5000}" for i in rng.integers(0, 10**6, n)],
            "tag_string_copyright": [f"series_{i % 900}" for i in rng.integers(0, 10**6, n)],
            "tag_string_artist": [f"artist_{i % 30000}" for i in rng.integers(0, 10**6, n)],
            "tag_string_meta": rng.choice(["highres", "absurdres", "highres commentary_request", ""], n),
            "rating": rng.choice(["g", "s", "q", "e"], n, p=[0.5, 0.3, 0.1, 0.1]),
            "fav_count": rng.zipf(1.6, n).clip(0, 100_000),
            "created_at": [f"{y}-06-01T00:00:00" for y in rng.integers(2005, 2026, n)],
        })
        writer = writer or pq.ParquetWriter(str(path), table.schema)
        writer.write_table(table)
    writer.close()


def kohaku_settings():
    from loraloom.loaders.captions import CaptionSettings

    return CaptionSettings(underscores=True, escape_parentheses=True, dedupe=True, shuffle=True,
                           tag_dropout=0.15)


def build(metadata: Path, cache: Path):
    from loraloom.loaders.buckets import BucketSettings
    from loraloom.loaders.dataset import TrainingData
    from loraloom.loaders.sources import SourceSettings

    source = SourceSettings(path=str(metadata), booru=True, captions=kohaku_settings())
    return TrainingData.build([source], resolution=1024, divisor=16, seed=0, cache_root=cache,
                              buckets=BucketSettings(enabled=True, min_side=256, max_side=4096))


def index_step(metadata: Path, cache: Path) -> dict:
    start = time.perf_counter()
    import loraloom.loaders.dataset  # noqa: F401 (imports torch: timed apart from the index)
    imports = time.perf_counter() - start
    start = time.perf_counter()
    data = build(metadata, cache)
    seconds = time.perf_counter() - start
    return {"records": len(data), "seconds": seconds, "imports": imports, "buckets": len(data.summary()["buckets"]),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def caption_step(metadata: Path, cache: Path, count: int) -> dict:
    from loraloom.loaders.captions import prepare_captions, process, run_chain, split_chain, unpack
    from loraloom.loaders.sampler import BucketBatchSampler

    data = build(metadata, cache)
    start = time.perf_counter()
    sampler = BucketBatchSampler(data.bucket_id, data.repeats, batch_size=4, seed=0)
    batches = sampler.epoch_batches(0)
    plan_seconds = time.perf_counter() - start
    # What a step runs: the batch's rng seeded, then per caption the record's prepared caption read from the
    # index, shuffle and dropout, the text joined; in training order (random rows), as many as --captions. Also
    # with batches of one, where every caption pays for seeding an rng.
    steps = batches[:count // 4]
    per_step = timed(lambda: [text for batch, ids in enumerate(steps) for text in data.captions_at(ids, 0, batch)])
    singles = [row for ids in steps for row in ids]
    batch_of_one = timed(lambda: [data.captions_at([row], 0, batch)[0] for batch, row in enumerate(singles)])
    # The one-off fixed part (parse, underscores, escaping, dedupe, packing), done while the index is built.
    raw = [data.captions[i].as_py() for i in range(count)]
    split = split_chain(kohaku_settings().chain())
    fixed = timed(lambda: prepare_captions(raw, False, split))
    # One shared rng, as the figure before preparing was taken: the whole chain from the caption text, and the
    # per-step processors on the prepared captions (the per-step path without its per-caption seeding).
    rng, chain = random.Random(0), kohaku_settings().chain()
    whole = timed(lambda: [process(text, chain, rng) for text in raw])
    packed = [data.prepared[i].as_py() for i in range(count)]
    shared = timed(lambda: [run_chain(unpack(p, False), split.per_step, rng).render() for p in packed])
    return {"captions": len(singles), "per_step": per_step, "batch_of_one": batch_of_one, "fixed": fixed,
            "whole_chain": whole, "shared": shared, "example": data.captions_at(steps[0], 0, 0)[0],
            "records": len(data), "epoch_plan_seconds": plan_seconds, "batches": len(batches)}


def timed(work) -> dict:
    """Items per CPU second and per wall second of ``work()`` (a list)."""
    start, cpu = time.perf_counter(), time.process_time()
    count = len(work())
    return {"per_cpu_second": count / (time.process_time() - cpu), "per_second": count / (time.perf_counter() - start)}


def in_subprocess(step: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--step", step, "--folder", str(args.folder), "--records",
               str(args.records), "--captions", str(args.captions)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--captions", type=int, default=100_000, help="captions for the throughput figure")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/loraloom-scale"))
    parser.add_argument("--step", choices=["index", "captions"], help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="3000 records, 1000 captions: checks that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.records, args.captions = 3000, 1000
        args.folder = Path(tempfile.mkdtemp(prefix="loraloom-scale-"))
    metadata, cache = args.folder / f"danbooru-{args.records}.parquet", args.folder / "cache"
    if args.step == "index":
        print(json.dumps(index_step(metadata, cache)))
        return
    if args.step == "captions":
        print(json.dumps(caption_step(metadata, cache, args.captions)))
        return
    args.folder.mkdir(parents=True, exist_ok=True)
    if not metadata.exists():
        start = time.perf_counter()
        generate(metadata, args.records)
        print(f"generated {args.records} records in {time.perf_counter() - start:.1f} s: {metadata}")
    for old in (cache / "index").glob("*.arrow") if (cache / "index").exists() else []:
        old.unlink()
    cold = in_subprocess("index", args)
    print(f"cold index: {cold['records']} records, {cold['buckets']} buckets in {cold['seconds']:.1f} s "
          f"(+ {cold['imports']:.1f} s imports), peak RSS {cold['peak_rss_mb']:.0f} MB")
    warm = in_subprocess("index", args)
    print(f"warm index (cached): {warm['seconds']:.2f} s (+ {warm['imports']:.1f} s imports), "
          f"peak RSS {warm['peak_rss_mb']:.0f} MB")
    captions = in_subprocess("captions", args)
    per_step, fixed, whole = captions["per_step"], captions["fixed"], captions["whole_chain"]
    print(f"captions on one core, per step (Kohaku chain's shuffle + 15% tag dropout on prepared captions, as "
          f"captions_at runs it, batches of 4): {per_step['per_cpu_second']:.0f} per CPU second, "
          f"{per_step['per_second']:.0f} per wall second ({captions['captions']} captions); "
          f"e.g. {captions['example'][:80]!r}")
    print(f"the same in batches of one (an rng seeded per caption): "
          f"{captions['batch_of_one']['per_cpu_second']:.0f} per CPU second")
    print(f"one-off fixed part (parse, underscores, escaping, dedupe, pack) at index build: "
          f"{fixed['per_cpu_second']:.0f} per CPU second, {captions['records'] / fixed['per_cpu_second']:.1f} CPU s "
          f"for all {captions['records']} records")
    print(f"with one shared rng (no per-caption seeding): whole chain from the text (as before preparing) "
          f"{whole['per_cpu_second']:.0f}, per-step processors on prepared captions "
          f"{captions['shared']['per_cpu_second']:.0f} per CPU second")
    print(f"one epoch plan of the bucket sampler: {captions['epoch_plan_seconds']:.2f} s "
          f"({captions['batches']} batches of 4)")


if __name__ == "__main__":
    main()
