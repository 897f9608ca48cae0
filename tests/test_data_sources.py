"""Sources, image decoding, robustness and the dataset index: every bad-input case is skipped and counted."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from loraloom.loaders import captions as cp
from loraloom.loaders import sources as src
from loraloom.loaders.buckets import BucketSettings
from loraloom.loaders.cache import EncoderCache
from loraloom.loaders.captions import CaptionSettings
from loraloom.loaders.dataset import TrainingData
from loraloom.loaders.images import DatasetError, decode_batches, decode_image, from_pil, load_crop


def write_image(path, size=(64, 48), color=(200, 30, 30), mode="RGB", caption: str | None = "a, b", **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def build(sources, **kw) -> TrainingData:
    kw.setdefault("resolution", 64)
    return TrainingData.build(sources, divisor=16, **kw)


def test_a_folder_with_repeat_folders_and_every_bad_input_counted(tmp_path):
    root = tmp_path / "data"
    write_image(root / "a.png", caption="first")
    write_image(root / "10_char" / "b.png", color=(1, 2, 3), caption="second")
    write_image(root / "10_char" / "deeper" / "c.jpg", color=(9, 9, 9), caption="third")
    write_image(root / "dup.png", caption="same bytes as a.png")
    write_image(root / "nocap.png", color=(5, 5, 5), caption=None)
    write_image(root / "latin1.png", color=(6, 6, 6)).with_suffix(".txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "empty.png").write_bytes(b"")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (root / "notes.md").write_text("ignored: not an image")
    data = build([src.SourceSettings(path=str(root))])
    names = sorted(p.as_py().split("/")[-1] for p in data.paths)
    assert names == ["a.png", "b.png", "c.jpg"]
    assert dict(data.skipped) == {"missing caption": 1, "caption not UTF-8": 1, "empty file": 1,
                                  "unreadable image": 1, "duplicate file": 1}
    repeats = {p.as_py().split("/")[-1]: r for p, r in zip(data.paths, data.repeats)}
    assert repeats == {"a.png": 1, "b.png": 10, "c.jpg": 10}
    assert [data.fixed_caption(i) for i in range(3)] == ["second", "third", "first"]  # sorted by path
    empty = build([src.SourceSettings(path=str(root), missing_caption="empty")], trigger="zwx")
    assert sorted(empty.fixed_caption(i) for i in range(len(empty))) == ["zwx", "zwx, first", "zwx, second",
                                                                         "zwx, third"]
    # Notepad's UTF-8 (a byte-order mark, CRLF line ends) reads as the same caption.
    (root / "a.txt").write_bytes("\ufefffirst, tag\r\nother line\r\n".encode())
    assert build([src.SourceSettings(path=str(root))]).fixed_caption(2) == "first, tag"


def test_strict_mode_names_the_file_and_an_unusable_dataset_names_the_folder(tmp_path):
    root = tmp_path / "data"
    write_image(root / "a.png")
    (root / "broken.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(DatasetError, match=r"broken\.png: unreadable image \(data\.strict"):
        build([src.SourceSettings(path=str(root))], strict=True)
    # An index cached by a lenient run, which skipped the file, does not hide it from a strict one.
    cache = tmp_path / "cache"
    assert dict(build([src.SourceSettings(path=str(root))], cache_root=cache).skipped) == {"unreadable image": 1}
    with pytest.raises(DatasetError, match=r"broken\.png: unreadable image \(data\.strict"):
        build([src.SourceSettings(path=str(root))], strict=True, cache_root=cache)
    (root / "broken.png").unlink()
    assert len(build([src.SourceSettings(path=str(root))], strict=True, cache_root=cache)) == 1
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=rf"{bad}: no usable images \(skipped: {{'empty file': 1}}\)"):
        build([src.SourceSettings(path=str(bad))])
    with pytest.raises(DatasetError, match="dataset source not found"):
        build([src.SourceSettings(path=str(tmp_path / "nowhere"))])


def test_small_images_are_skipped_when_buckets_set_a_minimum(tmp_path):
    root = tmp_path / "data"
    write_image(root / "big.png", size=(64, 64))
    write_image(root / "tiny.png", size=(8, 40), color=(0, 0, 255))
    data = build([src.SourceSettings(path=str(root))], buckets=BucketSettings(enabled=True, min_side=16))
    assert len(data) == 1 and data.skipped == {"smaller than 16 px": 1}


def test_truncated_images_fail_at_decoding_and_are_reported_not_raised(tmp_path):
    good = write_image(tmp_path / "good.png", size=(64, 64))
    full = tmp_path / "full.jpg"
    Image.effect_noise((64, 64), 50).convert("RGB").save(full, quality=95)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(full.read_bytes()[:3000])  # header intact: the index accepts it, decoding fails
    data = build([src.SourceSettings(path=str(tmp_path), missing_caption="empty")])
    specs = [data.latent_spec(i) for i in range(len(data))]
    results = list(decode_batches(specs, batch_size=8, workers=0))
    done = [specs[i].path for r in results for i in r[0]]
    failed = [specs[i].path for r in results for i in r[2]]
    assert sorted(done) == sorted([str(good), str(full)]) and failed == [str(truncated)]
    assert all(r[1].shape[1:] == (3, 64, 64) for r in results if r[1] is not None)
    data.drop([specs.index(next(s for s in specs if s.path == str(truncated)))], "unreadable image")
    assert len(data) == 2 and data.skipped["unreadable image"] == 1


def test_latent_keys_are_the_specs_keys_before_and_after_a_drop(tmp_path):
    for i in range(5):
        write_image(tmp_path / f"{i}.png", size=(64 + 16 * i, 64), color=(i, 0, 0))
    data = build([src.SourceSettings(path=str(tmp_path))], buckets=BucketSettings(enabled=True, flip=True))
    pairs = [(row, flip) for row in range(len(data)) for flip in (False, True)]
    expected = [data.latent_spec(row, flip).key for row, flip in pairs]
    assert data.latent_keys(*zip(*pairs)) == expected and len(set(expected)) == 10
    data.drop([1, 3], "unreadable image")
    assert data.latent_keys([0, 1, 2, 2], [False, False, False, True]) == [expected[0], expected[4], expected[8],
                                                                            expected[9]]


def test_the_encoder_cache_finds_missing_entries_without_reading_and_reads_back_what_it_put(tmp_path):
    cache = EncoderCache(tmp_path, "latents", "vae-id")
    a, b = "a" * 64, "b" * 64
    assert cache.missing([a, b]) == [0, 1]
    cache.put(a, {"latent": torch.ones(2, 3)})
    assert cache.missing([a, b]) == [1] and (cache.hits, cache.misses) == (1, 3)
    got = cache.get_many([a, b], lambda missing: [{"latent": torch.zeros(1)} for _ in missing])
    assert torch.equal(got[0]["latent"], torch.ones(2, 3)) and cache.missing([b]) == []


def test_decoding_handles_alpha_palette_16_bit_cmyk_and_exif_rotation(tmp_path):
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(rgba)
    assert decode_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert decode_image(rgba, background=(0, 0, 0)).getpixel((0, 0)) == (0, 0, 0)
    half = tmp_path / "half.png"
    Image.new("RGBA", (4, 4), (255, 0, 0, 128)).save(half)
    assert decode_image(half, background=(0, 0, 255)).getpixel((0, 0)) == (128, 0, 127)
    palette = tmp_path / "palette.png"
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.save(palette, transparency=0)
    assert decode_image(palette).getpixel((0, 0)) == (10, 200, 30)
    wide = tmp_path / "grey16.png"
    Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16)).save(wide)
    assert Image.open(wide).mode.startswith("I")
    assert decode_image(wide).getpixel((0, 0)) == (128, 128, 128)  # scaled, not clipped to white
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(cmyk, quality=100)
    r, g, b = decode_image(cmyk).getpixel((4, 4))
    assert r > 240 and g < 15 and b < 15
    Image.linear_gradient("L").resize((64, 32)).save(tmp_path / "gradient.png")
    rotated = tmp_path / "rotated.jpg"
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    im.save(rotated, exif=exif, quality=100)
    upright = decode_image(rotated)
    assert upright.size == (20, 40) and upright.getpixel((10, 5))[0] > 200 and upright.getpixel((10, 35))[0] < 50
    data = build([src.SourceSettings(path=str(tmp_path), missing_caption="empty")],
                 buckets=BucketSettings(enabled=True, min_side=4))
    rows = {p.as_py().split("/")[-1]: i for i, p in enumerate(data.paths)}
    assert data.bucket[rows["rotated.jpg"]][1] > data.bucket[rows["rotated.jpg"]][0]  # portrait bucket
    pixels = load_crop(rotated, (32, 64), (0, 0), (32, 64))
    assert pixels.shape == (3, 64, 32) and pixels[0, 5, 5] > 0.8 and pixels[0, 60, 5] < -0.8  # white on top
    assert torch.equal(load_crop(tmp_path / "gradient.png", (64, 32), (0, 0), (64, 32), flip=True),
                       load_crop(tmp_path / "gradient.png", (64, 32), (0, 0), (64, 32)).flip(2))



def test_a_large_jpeg_decodes_at_a_reduced_scale_that_still_covers_its_size(tmp_path):
    big = tmp_path / "big.jpg"
    Image.linear_gradient("L").resize((800, 400)).convert("RGB").save(big, quality=95)
    assert decode_image(big).size == (800, 400)
    assert decode_image(big, cover=(100, 50)).size == (100, 50)  # libjpeg's 1/8 scale
    assert decode_image(big, cover=(101, 50)).size == (200, 100)  # 1/8 would not cover: 1/4
    sideways = tmp_path / "sideways.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 800 x 400, shown 400 x 800
    Image.open(big).save(sideways, exif=exif, quality=95)
    assert decode_image(sideways, cover=(60, 120)).size == (100, 200)
    # Cut to a bucket, the result matches decoding every pixel and resizing.
    reduced = load_crop(big, (160, 80), (16, 8), (128, 64))
    full = from_pil(decode_image(big).resize((160, 80), Image.Resampling.LANCZOS).crop((16, 8, 144, 72)))
    assert reduced.shape == full.shape == (3, 64, 128) and (reduced - full).abs().mean() < 0.02

def metadata_rows(folder, count=3):
    rows = []
    for i in range(count):
        name = f"img{i}.png"
        write_image(folder / name, color=(i, 0, 0), caption=None)
        rows.append({"path": name, "caption": f"tag{i}, other", "tags": ["x", f"y{i}"]})
    return rows


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_metadata_files_with_path_and_caption_columns(tmp_path, suffix):
    rows = metadata_rows(tmp_path / "imgs")
    file = tmp_path / "imgs" / f"meta{suffix}"
    if suffix == ".jsonl":
        file.write_text("\n".join(json.dumps(r) for r in rows))
    elif suffix == ".csv":
        file.write_text("path,caption\n" + "\n".join(f'{r["path"]},"{r["caption"]}"' for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), file)
    columns = ("caption",) if suffix == ".csv" else ("caption", "tags")
    data = build([src.SourceSettings(path=str(file), caption_columns=columns)])
    expected = [f"tag{i}, other" + ("" if suffix == ".csv" else f", x, y{i}") for i in range(3)]
    assert [data.fixed_caption(i) for i in range(3)] == expected
    assert (data.table.column("width").to_numpy() == 64).all()  # read from the header: no size columns
    with pytest.raises(DatasetError, match="no column 'file'"):
        build([src.SourceSettings(path=str(file), path_column="file")])


def booru_record(i: int) -> dict:
    return {"tag_string_general": f"1girl solo tag_{i}", "tag_string_character": "hatsune_miku",
            "tag_string_copyright": "vocaloid", "tag_string_artist": "", "tag_string_meta": "highres",
            "rating": "g", "fav_count": i * 10, "created_at": f"{2010 + i}-01-01", "md5": f"{i:032x}",
            "image_width": 1024, "image_height": 512 + 256 * i}


def test_booru_metadata_file_and_sidecars_give_kohaku_captions(tmp_path):
    file = tmp_path / "danbooru.jsonl"
    file.write_text("\n".join(json.dumps({"path": f"{i}.jpg", **booru_record(i)}) for i in range(4)))
    settings = CaptionSettings(underscores=True)
    data = build([src.SourceSettings(path=str(file), booru=True, captions=settings)], resolution=512,
                 buckets=BucketSettings(enabled=True))
    assert data.fixed_caption(3) == "1girl, hatsune miku, vocaloid, solo, tag 3, masterpiece, early, highres, safe"
    assert data.fixed_caption(0) == "1girl, hatsune miku, vocaloid, solo, tag 0, worst quality, old, highres, safe"
    assert data.contents[0].as_py() == f"md5:{0:032x}"  # hash and size from the metadata: no image read
    assert data.bucket[0].tolist() == [720, 368] and data.bucket[3].tolist() == [464, 560]
    folder = tmp_path / "side"
    for i in range(2):
        write_image(folder / f"{i}.png", color=(i, 1, 1), caption=None)
        (folder / f"{i}.png.json").write_text(json.dumps(booru_record(i)), encoding="utf-8-sig" if i else "utf-8")
    write_image(folder / "lonely.png", color=(7, 7, 7), caption=None)
    sidecar = build([src.SourceSettings(path=str(folder), booru=True)])
    assert len(sidecar) == 2 and sidecar.skipped == {"missing booru metadata": 1}
    assert sidecar.fixed_caption(1) == "1girl, hatsune_miku, vocaloid, solo, tag_1, masterpiece, early, highres, safe"


def test_the_index_is_cached_and_rebuilt_when_the_source_changes(tmp_path, monkeypatch):
    rows = metadata_rows(tmp_path)
    file = tmp_path / "meta.jsonl"
    file.write_text("\n".join(json.dumps(r) for r in rows))
    source = src.SourceSettings(path=str(file))
    first = build([source], cache_root=tmp_path / "cache")
    real = src.index_source
    monkeypatch.setattr(src, "index_source", lambda *a: pytest.fail("the cached index was not used"))
    again = build([source], cache_root=tmp_path / "cache")
    assert again.table.equals(first.table)
    monkeypatch.setattr(src, "index_source", real)
    file.write_text("\n".join(json.dumps(r) for r in rows[:2]))
    assert len(build([source], cache_root=tmp_path / "cache")) == 2


def test_each_steps_caption_is_the_whole_chain_run_on_the_caption_text(tmp_path):
    """Fixed processors run once with the index, per-step ones each step: the text is the same as running the
    whole chain on the caption file's text with the step's seed (and a tag holding \\x1f is not packed)."""
    rng = random.Random(0)
    texts = [f"a_b, c ||| {', '.join(rng.sample(['d_e', 'f', 'g', 'f', 'h_(i)', 'j'], 5))} ||| k\nl_m ||| n, o"
             for _ in range(20)] + ["odd\x1ftag ||| p, q, r_st", "only, one_line"]
    file = tmp_path / "meta.jsonl"
    file.write_text("\n".join(json.dumps({"path": f"{i}.png", "caption": t, "md5": f"{i:032x}", "width": 64,
                                          "height": 64}) for i, t in enumerate(texts)))
    settings = CaptionSettings(choose=True, underscores=True, escape_parentheses=True, dedupe=True, shuffle=True,
                               tag_dropout=0.2)
    source = src.SourceSettings(path=str(file), captions=settings)
    chain = settings.chain("trig")
    data = build([source], trigger="trig", seed=3, cache_root=tmp_path / "cache")
    assert data.prepared[20].as_py() is None and data.prepared[21].as_py() is not None
    # A batch's captions draw from one rng seeded by (seed, epoch, batch), slot by slot.
    step_rng = random.Random("step:3:2:7")
    expected = [cp.process(text, chain, step_rng) for text in texts]
    assert data.captions_at(range(len(texts)), 2, 7) == expected
    assert data.captions_at(range(5), 2, 7) == expected[:5]  # what dataset inspect shows of a batch
    assert data.captions_at(range(5), 2, 8) != expected[:5]
    # Validation reads the first line after the fixed processors (choose, per step, does not skip them).
    assert data.fixed_caption(21) == "trig, only, one line" and data.fixed_caption(20) == "trig, odd\x1ftag, p, q, r st"
    variants = build([source], trigger="trig", seed=3, caption_variants=4, cache_root=tmp_path / "cache")
    choice_rng, chosen = random.Random("step:3:5:0"), []
    for row, text in enumerate(texts):
        content = variants.contents[row].as_py()
        pool = [cp.process(text, chain, random.Random(f"variant:3:{content}:{v}")) for v in range(4)]
        assert variants.variant_captions(row) == pool
        chosen.append(pool[choice_rng.randrange(4)])
    assert variants.captions_at(range(len(texts)), 5, 0) == chosen
    # The trigger is part of the prepared captions, so another trigger is another cached index.
    other = build([source], trigger="other", seed=3, cache_root=tmp_path / "cache")
    assert other.fixed_caption(21) == "other, only, one line"
    assert len(list((tmp_path / "cache" / "index").glob("*.arrow"))) == 2


def test_weights_sources_and_the_fingerprint(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_image(a / "1.png", color=(1, 0, 0))
    write_image(b / "2.png", color=(2, 0, 0), caption="x, y")
    data = build([src.SourceSettings(path=str(a), repeats=3), src.SourceSettings(path=str(b), weight=0.5)])
    assert data.repeats.tolist() == [3.0, 0.5]
    summary = data.summary()
    assert [s["images"] for s in summary["sources"]] == [1, 1] and summary["buckets"] == {"64x64": 2}
    settings = data.settings_dict()
    sources = [src.SourceSettings(path=str(a), repeats=3), src.SourceSettings(path=str(b), weight=0.5)]
    assert build(sources).fingerprint(settings) == data.fingerprint(settings)
    (b / "2.txt").write_text("x, z")
    changed = build(sources)
    assert changed.fingerprint(settings) != data.fingerprint(settings)
    assert changed.fingerprint(settings) != changed.fingerprint({**settings, "seed": 1})


def test_captions_vary_per_epoch_with_shuffle_and_come_from_k_variants_when_cached(tmp_path):
    tags = ", ".join(f"t{i}" for i in range(12))
    write_image(tmp_path / "d" / "a.png", caption=f"keep ||| {tags}")
    shuffle = CaptionSettings(shuffle=True)
    per_step = build([src.SourceSettings(path=str(tmp_path / "d"), captions=shuffle)])
    assert per_step.varies(0)
    epochs = {per_step.captions_at([0], epoch, 0)[0] for epoch in range(6)}
    assert len(epochs) == 6 and all(c.startswith("keep, ") for c in epochs)
    assert per_step.captions_at([0], 2, 0)[0] == per_step.captions_at([0], 2, 0)[0]
    assert per_step.fixed_caption(0) == f"keep, {tags}"
    variants = build([src.SourceSettings(path=str(tmp_path / "d"), captions=shuffle)], caption_variants=3)
    pool = variants.variant_captions(0)
    assert len(set(pool)) == 3
    assert {variants.captions_at([0], epoch, 0)[0] for epoch in range(30)} == set(pool)
    plain = build([src.SourceSettings(path=str(tmp_path / "d"))], caption_variants=3)
    assert not plain.varies(0) and plain.variant_captions(0) == [f"keep, {tags}"]
    assert {plain.captions_at([0], e, 0)[0] for e in range(5)} == {f"keep, {tags}"}
    random.seed(0)  # the caption functions never read the global RNG
    a = per_step.captions_at([0], 4, 0)[0]
    random.seed(1)
    assert per_step.captions_at([0], 4, 0)[0] == a
