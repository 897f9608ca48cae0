"""The training data of a run: every source indexed, de-duplicated, bucketed, and its captions as read.

:class:`TrainingData` holds one row per record (no pixels, no latents), so a million records cost a few
hundred MB; the session reads cached latents per batch and the CLI's ``dataset inspect`` prints the same
captions the model reads at a given step. The caption texts of a batch are a pure function of (seed, epoch,
batch, its records, caption_variants), so resume and inspection agree with training.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .buckets import BucketSettings, assign_buckets, center_crops, random_crops, resized_size
from .captions import Caption, fixed_part, render_packed, run_chain, split_chain, unpack
from .images import DatasetError
from .sources import SourceSettings, cached_index


@dataclass(frozen=True)
class LatentSpec:
    """What one cached latent is: the image content, its bucket, crop and mirror (all part of the key)."""
    path: str
    content: str
    bucket: tuple[int, int]  # (width, height) in pixels
    resized: tuple[int, int]
    crop: tuple[int, int]  # (left, top) in the resized image: SDXL's crop conditioning
    flip: bool

    @property
    def key(self) -> str:
        return latent_digest(self.content, self.bucket, self.resized, self.crop, self.flip).hex()


@dataclass(frozen=True)
class Geometry:
    """Where a training sample's pixels came from, in pixels: SDXL's size conditioning reads it."""
    original: tuple[int, int]  # (width, height) of the source image
    crop: tuple[int, int]  # (left, top) of the crop in the resized image, mirrored with the image
    target: tuple[int, int]  # (width, height) of the bucket


def latent_digest(content: str, bucket: tuple[int, int], resized: tuple[int, int], crop: tuple[int, int],
                  flip: bool) -> bytes:
    """sha256 of what a latent is (see :class:`LatentSpec`); its hex is the latent cache key."""
    return hashlib.sha256(f"{content}|{bucket}|{resized}|{crop}|{int(flip)}".encode()).digest()


class TrainingData:
    def __init__(self, table: pa.Table, skipped: Counter, sources: Sequence[SourceSettings], trigger: str,
                 resolution: int, divisor: int, buckets: BucketSettings, seed: int, caption_variants: int):
        self.sources = tuple(sources)
        self.skipped = skipped
        self.resolution, self.divisor, self.bucket_settings = resolution, divisor, buckets
        self.seed, self.caption_variants = seed, caption_variants
        self.chains = [split_chain(s.captions.chain(trigger)) for s in sources]
        self.natural = [s.captions.format == "text" for s in sources]
        self._set_table(table)

    @classmethod
    def build(cls, sources: Sequence[SourceSettings], *, trigger: str = "", resolution: int, divisor: int,
              buckets: BucketSettings = BucketSettings(), seed: int = 0, caption_variants: int = 0,  # noqa: B008 (frozen)
              strict: bool = False, cache_root: str | Path | None = None) -> TrainingData:
        """Index every source (reusing cached indexes), drop duplicates and too-small images, assign buckets.

        ``trigger`` is put in front of every caption that lacks it.
        """
        if not sources:
            raise DatasetError("no dataset: set data.images to a folder of images, or add [[data.sources]]")
        tables, skipped = [], Counter()
        for number, source in enumerate(sources):
            table, skips = cached_index(source, Path(cache_root) if cache_root else None, strict, trigger)
            skipped.update(skips)
            repeats = pc.multiply(table.column("repeats"), pa.scalar(source.weight, pa.float32()))
            table = table.set_column(table.schema.get_field_index("repeats"), "repeats", repeats)
            tables.append(table.append_column("source", pa.array(np.full(table.num_rows, number, np.int16))))
        table = pa.concat_tables(tables)
        keep = _first_occurrences(table.column("content"))
        _count(skipped, "duplicate file", int((~keep).sum()), strict, "the dataset")
        low = buckets.limits(resolution, divisor)[0] if buckets.enabled else 1
        width, height = table.column("width").to_numpy(), table.column("height").to_numpy()
        small = keep & ((width < low) | (height < low))
        _count(skipped, f"smaller than {low} px", int(small.sum()), strict, "the dataset")
        usable = keep & ~small
        table = table if usable.all() else table.filter(pa.array(usable))  # filter copies every column
        if table.num_rows == 0:
            names = ", ".join(s.path for s in sources)
            raise DatasetError(f"{names}: no usable images (skipped: {dict(skipped) or 'none found'}); check the "
                               "folder holds images Pillow reads, with captions beside them")
        return cls(table, skipped, sources, trigger, resolution, divisor, buckets, seed, caption_variants)

    def _set_table(self, table: pa.Table) -> None:
        width, height = table.column("width").to_numpy(), table.column("height").to_numpy()
        bucket = assign_buckets(width, height, self.resolution, self.divisor, self.bucket_settings)
        crop = (random_crops(width, height, bucket, table.column("content").to_pylist(), self.seed)
                if self.bucket_settings.crop == "random" else center_crops(width, height, bucket))
        self._set_rows(table, bucket, resized_size(width, height, bucket), crop)

    def _set_rows(self, table: pa.Table, bucket: np.ndarray, resized: np.ndarray, crop: np.ndarray,
                  latent_digests: np.ndarray | None = None) -> None:
        self.table, self.bucket, self.resized, self.crop = table, bucket, resized, crop
        self._latent_digests = latent_digests
        # Chunked columns as they are: indexing one costs a fraction of a microsecond more than an array, where
        # concatenating them would copy (or, for a memory-mapped cached index, read) every string.
        self.paths, self.captions, self.contents, self.prepared = (
            table.column(c) for c in ("path", "caption", "content", "prepared"))
        self.source = table.column("source").to_numpy()
        self.repeats = table.column("repeats").to_numpy()
        # np.unique(bucket, axis=0) in the same (width, height) order, on one int64 per row: 10x faster.
        sizes, self.bucket_id = np.unique(bucket[:, 0].astype(np.int64) << 32 | bucket[:, 1], return_inverse=True)
        self.bucket_sizes = np.stack([sizes >> 32, sizes & 0xFFFFFFFF], axis=1)

    def __len__(self) -> int:
        return self.table.num_rows

    def drop(self, rows: Sequence[int], reason: str) -> None:
        """Remove records found unusable later (an image that does not decode), counted under ``reason``."""
        if len(rows):
            keep = np.ones(len(self), dtype=bool)
            keep[np.asarray(rows)] = False
            self.skipped[reason] += len(rows)
            # Filtered, not recomputed: a kept record's bucket and crop (part of its cache key) never change.
            digests = self._latent_digests[keep] if self._latent_digests is not None else None
            self._set_rows(self.table.filter(pa.array(keep)), self.bucket[keep], self.resized[keep], self.crop[keep],
                           digests)

    # ------------------------------------------------------------ latents

    def latent_spec(self, row: int, flip: bool = False) -> LatentSpec:
        return LatentSpec(self.paths[row].as_py(), self.contents[row].as_py(), tuple(self.bucket[row].tolist()),
                          tuple(self.resized[row].tolist()), tuple(self.crop[row].tolist()), flip)

    def latent_keys(self, rows: Sequence[int], flips: Sequence[bool]) -> list[str]:
        """``latent_spec(row, flip).key`` of each pair, from digests of every record computed on first use
        (32 bytes per record and flip: a million records hold 32 MB, not a million key strings)."""
        if self._latent_digests is None:
            self._latent_digests = self._all_latent_digests()
        return [self._latent_digests[row, int(flip)].tobytes().hex() for row, flip in zip(rows, flips)]

    def _all_latent_digests(self) -> np.ndarray:
        """(records, flips, 32) uint8: each record's latent digest unmirrored and, with buckets.flip, mirrored."""
        flips = (False, True) if self.bucket_settings.flip else (False,)
        sizes = [list(map(tuple, a.tolist())) for a in (self.bucket, self.resized, self.crop)]
        joined = b"".join(latent_digest(content, bucket, resized, crop, flip)
                          for content, bucket, resized, crop in zip(self.contents.to_pylist(), *sizes)
                          for flip in flips)
        return np.frombuffer(joined, np.uint8).reshape(len(self), len(flips), 32)

    def geometry(self, rows: Sequence[int], flips: Sequence[bool]) -> list[Geometry]:
        """Each sample's :class:`Geometry`; a mirrored crop is measured from the other side."""
        width, height = self.table.column("width"), self.table.column("height")
        out = []
        for row, flip in zip(rows, flips):
            (bucket_w, bucket_h), (resized_w, _), (left, top) = (tuple(a[row].tolist()) for a in
                                                                  (self.bucket, self.resized, self.crop))
            out.append(Geometry((width[row].as_py(), height[row].as_py()),
                                (resized_w - bucket_w - left if flip else left, top), (bucket_w, bucket_h)))
        return out

    def flips(self, rows: Sequence[int], epoch: int) -> list[bool]:
        """Whether each record is mirrored in ``epoch`` (always False unless buckets.flip)."""
        if not self.bucket_settings.flip:
            return [False] * len(rows)
        return [random.Random(f"flip:{self.seed}:{epoch}:{r}").random() < 0.5 for r in rows]

    # ------------------------------------------------------------ captions

    def varies(self, row: int) -> bool:
        """Whether this record's caption changes from step to step (its chain has per-step processors)."""
        return bool(self.chains[self.source[row]].per_step)

    def any_varies(self, rows: Sequence[int]) -> bool:
        """Whether any of these records' captions change from step to step: per source, not per record."""
        return any(self.chains[source].per_step for source in np.unique(self.source[np.asarray(rows, dtype=int)]))

    def fixed_caption(self, row: int) -> str:
        """The caption with only the fixed processors (of its first line): for validation, and all a record
        has if none vary. Prepared with the index, so this only joins the tags."""
        packed = self.prepared[row].as_py()
        return render_packed(packed) if packed is not None else self._fixed_part(row).render()

    def variant_captions(self, row: int) -> list[str]:
        """The ``caption_variants`` pre-encodable captions of a varying record (its fixed caption otherwise)."""
        if not self.varies(row):
            return [self.fixed_caption(row)]
        return [self._variant(row, v) for v in range(self.caption_variants)]

    def captions_at(self, rows: Sequence[int], epoch: int, batch: int) -> list[str]:
        """The captions the model reads for the ``rows`` of batch ``batch`` of ``epoch``, in slot order.

        One rng per batch, drawn from slot by slot: the batch is the unit a resume restarts at, and seeding an
        rng costs as much as processing a caption. The first k captions do not depend on the rows after them.
        """
        rng = random.Random(f"step:{self.seed}:{epoch}:{batch}")
        texts = []
        for row in map(int, rows):  # Python ints: cheaper to index with than numpy's
            source = int(self.source[row])
            if not self.chains[source].per_step:
                texts.append(self.fixed_caption(row))
            elif self.caption_variants:
                texts.append(self._variant(row, rng.randrange(self.caption_variants)))
            else:
                texts.append(self._per_step(row, source, rng))
        return texts

    def _variant(self, row: int, choice: int) -> str:
        rng = random.Random(f"variant:{self.seed}:{self.contents[row].as_py()}:{choice}")
        return self._per_step(row, int(self.source[row]), rng)

    def _per_step(self, row: int, source: int, rng: random.Random) -> str:
        """The per-step processors on the record's prepared caption (the same text as the whole chain)."""
        packed = self.prepared[row].as_py()
        caption = unpack(packed, self.natural[source]) if packed is not None else self._fixed_part(row)
        return run_chain(caption, self.chains[source].per_step, rng).render()

    def _fixed_part(self, row: int) -> Caption:
        """The caption after the fixed processors, processed now: a tag holds a separator character, so the
        index could not pack it."""
        source = self.source[row]
        return fixed_part(self.captions[row].as_py(), self.natural[source], self.chains[source], random.Random(0))

    # ------------------------------------------------------------ reports

    def fingerprint(self, settings: dict) -> str:
        """Identity of what is trained on: every record's content key, caption and source, and ``settings``."""
        h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
        for column in ("content", "caption", "source"):
            for chunk in self.table.column(column).chunks:
                for buffer in chunk.buffers():
                    if buffer is not None:
                        h.update(buffer)
        return h.hexdigest()

    def summary(self) -> dict:
        """Images and repeats per source, skips by reason, and the bucket histogram ("WxH": count)."""
        per_source = []
        for number, source in enumerate(self.sources):
            mask = self.source == number
            per_source.append({"path": source.path, "images": int(mask.sum()),
                               "appearances_per_epoch": float(self.repeats[mask].sum())})
        sizes, counts = self.bucket_sizes, np.bincount(self.bucket_id, minlength=len(self.bucket_sizes))
        histogram = {f"{w}x{h}": int(c) for (w, h), c in sorted(zip(sizes.tolist(), counts.tolist()),
                                                               key=lambda x: -x[1])}
        return {"records": len(self), "sources": per_source, "skipped": dict(self.skipped), "buckets": histogram}

    def settings_dict(self) -> dict:
        """The settings that shape the batches; folder locations left out, so a moved dataset still resumes."""
        sources = [{k: v for k, v in asdict(s).items() if k not in ("path", "image_root")} for s in self.sources]
        return {"sources": sources, "resolution": self.resolution,
                "divisor": self.divisor, "buckets": asdict(self.bucket_settings), "seed": self.seed,
                "caption_variants": self.caption_variants}


def _first_occurrences(keys: pa.ChunkedArray) -> np.ndarray:
    """True at the first row of each distinct key (dictionary codes in Arrow: no million Python strings)."""
    codes = pc.dictionary_encode(keys).combine_chunks().indices.to_numpy()  # one dictionary for all chunks
    keep = np.zeros(len(keys), dtype=bool)
    keep[np.unique(codes, return_index=True)[1]] = True
    return keep


def _count(skipped: Counter, reason: str, count: int, strict: bool, where: str) -> None:
    if count and strict:
        raise DatasetError(f"{where}: {count} x {reason} (data.strict is on; remove them or turn it off)")
    if count:
        skipped[reason] += count
