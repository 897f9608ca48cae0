"""The data path inside a training session: two buckets, the caption chain, text caching modes, inspect."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from loraloom.loaders.buckets import BucketSettings
from loraloom.loaders.captions import CaptionSettings
from loraloom.training.cli import main
from loraloom.training.metrics import read_metrics
from loraloom.training.session import Session

TAGS = "red, circle, grey background, simple, flat colour, centred"


@pytest.fixture(scope="module")
def two_buckets(tmp_path_factory):
    """Three landscape and three portrait images (2:1 and 1:2) with kept / shuffled / kept caption sections."""
    folder = tmp_path_factory.mktemp("two_buckets")
    for i in range(6):
        size = (96, 48) if i % 2 else (48, 96)
        Image.new("RGB", size, (40 * i, 100, 200 - 30 * i)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"zwx, image {i} ||| {TAGS} ||| best quality")
    return folder


def open_session(make_config, folder, run="run", **data):
    data = {"images": str(folder), "resolution": 48, "buckets": BucketSettings(enabled=True, min_side=16),
            **data}
    return Session.open(make_config(run, data=data, train={"steps": 4, "batch_size": 2}))


def spy_on_text_encoders(session) -> list[str]:
    """Record what reaches the text encoders from now on (the real encoders still run)."""
    seen, real = [], session.encoding.text.encode_texts

    def recording(texts):
        seen.extend(texts)
        return real(texts)
    session.encoding.text.encode_texts = recording
    return seen


def test_training_on_two_buckets_with_the_caption_chain_encodes_changing_text(make_config, two_buckets):
    chain = CaptionSettings(shuffle=True, tag_dropout=0.2, underscores=True)
    session = open_session(make_config, two_buckets, captions=chain)
    assert sorted(session.data.summary()["buckets"]) == ["32x64", "64x32"]
    seen = spy_on_text_encoders(session)
    misses = session.encoding.text_cache.misses
    shapes = []
    real_next = session._next_batch

    def next_batch():
        batch = real_next()
        shapes.append({tuple(item.latent.shape) for item in batch})
        return batch
    session._next_batch = next_batch
    records = session.step(4)
    assert all(r["loss"] > 0 for r in records)
    assert session.encoding.text.loaded  # per-step captions: the encoders stay loaded
    assert all(len(s) == 1 for s in shapes)  # one bucket per batch
    assert {next(iter(s)) for s in shapes} == {(16, 16, 8), (16, 8, 16)}  # both buckets trained (VAE factor 4)
    assert len(seen) == 8 and all(t.startswith("zwx, image ") and t.endswith(", best quality") for t in seen)
    by_image = {}
    for text in seen:
        by_image.setdefault(text.split(",")[1], set()).add(text)
    assert any(len(texts) > 1 for texts in by_image.values())  # the same image read differently across epochs
    assert session.encoding.text_cache.misses == misses  # per-step texts are not written to the cache
    event = next(r for r in read_metrics(session.run_dir) if r["type"] == "dataset")
    assert event["buckets"] == {"32x64": 3, "64x32": 3} and event["train"] == 4


def test_without_augmentation_the_cached_encodings_are_used(make_config, two_buckets):
    session = open_session(make_config, two_buckets, "plain")
    assert not session.encoding.text.loaded  # everything is cached: no encoder stays in memory
    seen = spy_on_text_encoders(session)
    hits = session.encoding.text_cache.hits
    session.step(3)
    # Three steps' batches of two and the fourth batch, read ahead while the third step's backward ran.
    assert seen == [] and session.encoding.text_cache.hits == hits + 8


def test_k_variants_are_pre_encoded_and_chosen_per_epoch(make_config, two_buckets):
    chain = CaptionSettings(shuffle=True)
    session = open_session(make_config, two_buckets, "variants", captions=chain, caption_variants=2)
    assert not session.encoding.text.loaded
    seen = spy_on_text_encoders(session)
    session.step(4)
    assert seen == []  # every caption came from the 2 cached variants of its image
    pool = {t for r in session.train_rows for t in session.data.variant_captions(r)}
    assert len(pool) == 2 * len(session.train_rows)


def test_the_fingerprint_and_the_sampler_position_are_state(make_config, two_buckets):
    session = open_session(make_config, two_buckets, "state")
    session.step(3)
    assert session.state.sampler == {"epoch": 1, "batch": 1}  # 4 images in 2 buckets: 2 batches per epoch
    folder = session.checkpoint()
    assert json.loads((folder / "state.json").read_text())["sampler"] == {"epoch": 1, "batch": 1}
    again = open_session(make_config, two_buckets, "state2")
    assert again.dataset_fingerprint == session.dataset_fingerprint and len(session.dataset_fingerprint) == 64


def test_dataset_inspect_prints_the_index_and_the_captions_the_model_reads(make_config, two_buckets, tmp_path,
                                                                           capsys):
    chain = CaptionSettings(shuffle=True, underscores=True)
    cfg = make_config("inspect", data={"images": str(two_buckets), "resolution": 48, "captions": chain,
                                       "buckets": BucketSettings(enabled=True, min_side=16)},
                      train={"steps": 2, "batch_size": 2})
    path = tmp_path / "inspect.toml"  # where make_config wrote it
    assert main(["dataset", "inspect", str(path), "--samples", "4", "--step", "1"]) == 0
    out = capsys.readouterr().out
    assert "6 images: 4 for training, 2 for validation" in out
    assert "skipped: none" in out and "32x64 3" in out and "64x32 3" in out
    lines = [line for line in out.splitlines() if line.startswith("  epoch ")]
    assert len(lines) == 4 and lines[0].startswith("  epoch 0 batch 1 [")
    session = Session.open(cfg)
    seen = spy_on_text_encoders(session)
    session.step(2)
    printed = [line.split(": ", 1)[1] for line in lines[:2]]
    assert [repr(t) for t in seen[2:4]] == printed  # step 2 reads exactly what inspect showed for step 1
    assert main(["dataset", "inspect", str(path), "--samples", "2", "--seed", "5"]) == 0
    assert "(seed 5)" in capsys.readouterr().out
