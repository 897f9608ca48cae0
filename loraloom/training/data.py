"""The run's dataset as training sees it: the index of every source, the validation split and this rank's
batch sampler, and the ``dataset inspect`` report.

Apart from the session so that inspecting a dataset imports neither the adapter libraries nor the model
classes (seconds each); torch is needed for the seeded validation split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..loaders.dataset import TrainingData
from ..loaders.sampler import BucketBatchSampler, SamplerPosition
from ..loaders.sources import SourceSettings
from . import distributed
from .config import RunConfig
from .families import family


def training_data(cfg: RunConfig, cache_root: Path | None) -> TrainingData:
    """The run's dataset index: ``data.images`` (if set) and every ``[[data.sources]]``, bucketed."""
    d = cfg.data
    sources = [SourceSettings(path=d.images, caption_extension=d.caption_extension, missing_caption="empty",
                              captions=d.captions)] if d.images else []
    return TrainingData.build([*sources, *d.sources], trigger=d.trigger, resolution=d.resolution,
                              divisor=family(cfg.model.family).bucket_divisor, buckets=d.buckets,
                              seed=cfg.train.seed, caption_variants=d.caption_variants, strict=d.strict,
                              cache_root=cache_root)


def split_and_sample(cfg: RunConfig, data: TrainingData) -> tuple[np.ndarray, np.ndarray, BucketBatchSampler]:
    """(training rows, validation rows, this rank's batch sampler over the training rows)."""
    held_out = min(cfg.data.validation_images, len(data) - 1)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.train.seed)).numpy()
    train_rows = np.sort(order[held_out:])
    val_rows = np.sort(order[:held_out]) if held_out else train_rows[:4]
    rank, world = distributed.rank_and_world()
    sampler = BucketBatchSampler(data.bucket_id[train_rows], data.repeats[train_rows], cfg.train.batch_size,
                                 cfg.train.seed, rank, world)
    return train_rows, val_rows, sampler


def describe_dataset(cfg: RunConfig, cache_root: Path | None, samples: int = 8, step: int = 0) -> list[str]:
    """The index summary and ``samples`` captions from ``step`` on, exactly as the text encoder reads them.

    No image is decoded: a user checks sources, skips, buckets and the tag pipeline before training.
    """
    data = training_data(cfg, cache_root)
    train_rows, val_rows, sampler = split_and_sample(cfg, data)
    summary = data.summary()
    lines = [f"{summary['records']} images: {len(train_rows)} for training, {len(val_rows)} for validation"]
    lines += [f"  {s['path']}: {s['images']} images, {s['appearances_per_epoch']:g} per epoch with repeats"
              for s in summary["sources"]]
    skipped = summary["skipped"]
    lines.append("skipped: " + (", ".join(f"{reason} {count}" for reason, count in skipped.items()) or "none"))
    lines.append("buckets: " + ", ".join(f"{size} {count}" for size, count in summary["buckets"].items()))
    lines.append(f"captions from step {step} (seed {cfg.train.seed}), as the text encoder reads them:")
    position = SamplerPosition()
    for _ in range(step * cfg.train.gradient_accumulation):  # cheap: no image is read
        position = sampler.next_batch(position)[2]
    shown = 0
    while shown < min(samples, len(train_rows)):
        ids, where, position = sampler.next_batch(position)
        rows = train_rows[ids][: samples - shown]
        for row, caption in zip(rows, data.captions_at(rows, where.epoch, sampler.global_batch(where))):
            w, h = data.bucket[row]
            lines.append(f"  epoch {where.epoch} batch {where.batch} [{w}x{h}] "
                         f"{Path(data.paths[row].as_py()).name}: {caption!r}")
            shown += 1
    return lines

