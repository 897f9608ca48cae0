"""Bucket assignment properties and the batch sampler: determinism, resume, multi-rank cover-once."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from loraloom.loaders.buckets import (
    BucketSettings,
    assign_buckets,
    bucket_sizes,
    center_crops,
    random_crops,
    resized_size,
)
from loraloom.loaders.sampler import BucketBatchSampler, SamplerPosition
from loraloom.training.families import FAMILIES


def random_sizes(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(300, 5000, n), rng.integers(300, 5000, n)


@pytest.mark.parametrize("divisor", sorted({f.bucket_divisor for f in FAMILIES.values()} | {64}))
def test_buckets_have_the_target_area_the_divisor_and_the_limits(divisor):
    sizes = bucket_sizes(1024, divisor, 256, 4096)
    assert (sizes % divisor == 0).all() and sizes.min() >= 256 and sizes.max() <= 4096
    area = sizes[:, 0] * sizes[:, 1]
    assert (np.abs(area - 1024 ** 2) <= divisor / 2 * sizes[:, 0]).all()  # height rounded to the divisor
    assert [1024, 1024] in sizes.tolist()
    ratios = sizes[:, 0] / sizes[:, 1]
    assert (np.diff(ratios) > 0).all()


def test_each_image_gets_the_bucket_nearest_its_aspect_ratio():
    w, h = random_sizes(2000)
    settings = BucketSettings(enabled=True, min_side=256, max_side=4096)
    out = assign_buckets(w, h, 1024, 16, settings)
    sizes = bucket_sizes(1024, 16, 256, 4096)
    best = np.abs(np.log(w / h)[:, None] - np.log(sizes[:, 0] / sizes[:, 1])[None]).min(axis=1)
    assert np.allclose(np.abs(np.log(w / h) - np.log(out[:, 0] / out[:, 1])), best)
    off = assign_buckets(w, h, 512, 16, BucketSettings())
    assert (off == 512).all()


def test_no_upscale_keeps_small_images_at_their_own_size():
    settings = BucketSettings(enabled=True, min_side=256, max_side=4096, no_upscale=True)
    out = assign_buckets(np.array([500, 3000, 700]), np.array([300, 2000, 1000]), 1024, 16, settings)
    assert out[0].tolist() == [496, 288] and out[2].tolist() == [688, 992]  # under 1024², rounded down
    assert out[1, 0] * out[1, 1] == pytest.approx(1024 ** 2, rel=0.02)  # a large image is scaled down
    w, h = random_sizes(500, seed=1)
    out = assign_buckets(w, h, 1024, 16, settings)
    assert (out[:, 0] * out[:, 1] <= np.maximum(w * h, 1024 ** 2 * 1.02)).all()
    assert (out % 16 == 0).all()


def test_crops_cover_the_bucket_inside_the_resized_image():
    w, h = random_sizes(300, seed=2)
    buckets = assign_buckets(w, h, 1024, 16, BucketSettings(enabled=True))
    resized = resized_size(w, h, buckets)
    assert (resized >= buckets).all()
    keys = [f"sha256:{i:064x}" for i in range(len(w))]
    drawn = random_crops(w, h, buckets, keys, seed=0)
    for crops in (center_crops(w, h, buckets), drawn):
        assert (crops >= 0).all() and (crops + buckets <= resized).all()
    centre = center_crops(np.array([2000]), np.array([1000]), np.array([[1024, 1024]]))
    assert centre.tolist() == [[512, 0]]  # resized to 2048 x 1024: columns 512..1535 kept
    # A random crop belongs to the image and the seed: another image in front moves no crop (no cached latent
    # goes stale), another seed moves most of them, and every offset in range is reachable.
    shifted = random_crops(np.r_[1000, w], np.r_[3000, h], np.r_[[[1024, 1024]], buckets], ["new", *keys], 0)
    assert (shifted[1:] == drawn).all()
    sizes = np.full(2000, 1100), np.full(2000, 1000), np.tile([[1024, 1024]], (2000, 1))
    one = random_crops(*sizes, [str(i) for i in range(2000)], 0)  # resized 1126 x 1024: 103 left offsets
    assert (random_crops(*sizes, [str(i) for i in range(2000)], 1) != one).mean() > 0.45  # one axis of two moves
    assert one[:, 1].max() == 0 and set(one[:, 0].tolist()) == set(range(103))


def make_sampler(rank: int = 0, world: int = 1, n: int = 103, batch: int = 4, repeats=None) -> BucketBatchSampler:
    buckets = np.arange(n) % 3
    return BucketBatchSampler(buckets, np.ones(n) if repeats is None else repeats, batch, seed=7, rank=rank,
                              world_size=world)


def test_every_batch_is_one_bucket_and_an_epoch_covers_every_record_once():
    sampler = make_sampler()
    batches = sampler.epoch_batches(0)
    assert all(len(set(b % 3)) == 1 and 1 <= len(b) <= 4 for b in batches)
    assert sorted(np.concatenate(batches).tolist()) == list(range(103))
    assert [b.tolist() for b in batches] == [b.tolist() for b in make_sampler().epoch_batches(0)]  # seeded
    assert [b.tolist() for b in batches] != [b.tolist() for b in sampler.epoch_batches(1)]  # new order


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_share_every_epoch_with_nothing_twice_and_nothing_skipped(world):
    for epoch in range(3):
        seen = np.concatenate([b for r in range(world) for b in make_sampler(r, world).epoch_batches(epoch)])
        assert sorted(seen.tolist()) == list(range(103))
    counts = [len(make_sampler(r, world).epoch_batches(0)) for r in range(world)]
    assert max(counts) - min(counts) <= 1
    # Rank r's batch k is batch k * world + r of the single-process order: the number per-batch randomness
    # (caption shuffles) is seeded with, so ranks never share draws and match a single-process run.
    single = make_sampler().epoch_batches(1)
    for rank in range(world):
        sampler, position = make_sampler(rank, world), SamplerPosition(epoch=1)
        for k in range(counts[rank]):
            ids, where, position = sampler.next_batch(position)
            assert ids.tolist() == single[sampler.global_batch(where)].tolist() and where.batch == k


def test_resume_mid_epoch_continues_with_the_identical_batches():
    def stream(sampler, position, count):
        out = []
        for _ in range(count):
            ids, _, position = sampler.next_batch(position)
            out.append(ids.tolist())
        return out, position

    straight, _ = stream(make_sampler(), SamplerPosition(), 70)  # crosses two epoch boundaries
    first, position = stream(make_sampler(), SamplerPosition(), 31)
    saved = position.to_dict()
    rest, _ = stream(make_sampler(), SamplerPosition(**saved), 39)  # a fresh sampler: nothing replayed
    assert first + rest == straight
    assert saved == {"epoch": 1, "batch": 31 - len(make_sampler().epoch_batches(0))}


def test_repeats_and_fractional_weights_set_appearances_per_epoch():
    repeats = np.array([3.0] * 10 + [0.5] * 100)
    sampler = make_sampler(n=110, repeats=repeats)
    counts = Counter(np.concatenate(sampler.epoch_batches(0)).tolist())
    assert all(counts[i] == 3 for i in range(10))
    half = sum(counts[i] for i in range(10, 110))
    assert 30 < half < 70 and all(counts[i] <= 1 for i in range(10, 110))
    with pytest.raises(ValueError, match="positive repeat"):
        make_sampler(n=3, repeats=np.zeros(3))
