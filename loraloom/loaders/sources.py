"""Where training images come from: folders (with kohya repeat folders), metadata files, booru records.

Each source becomes a columnar table of records (path, caption text, content key, width, height, repeats)
without decoding a single image: folders read the image header only, metadata files are trusted for sizes
and hashes when they have them. A file that turns out unreadable is dropped when its latent is built,
before the first step. Skipped inputs are counted per reason; ``strict`` turns the first one into an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, UnidentifiedImageError

from .booru import BooruSettings, kohaku_captions, quality_levels, rating_name
from .captions import CaptionSettings, prepare_captions, split_chain
from .files import fsync_dir
from .images import IMAGE_SUFFIXES, DatasetError

REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")  # kohya: 10_mychar means every image in it 10 times per epoch
WIDTH_COLUMNS, HEIGHT_COLUMNS = ("width", "image_width"), ("height", "image_height")
HASH_COLUMNS = ("sha256", "md5")
SCHEMA = pa.schema([("path", pa.string()), ("caption", pa.string()), ("content", pa.string()),
                    ("width", pa.int32()), ("height", pa.int32()), ("repeats", pa.float32())])
INDEX_VERSION = "2"
CHUNK = 100_000  # rows turned into Python strings at a time: bounds peak memory on millions of records


@dataclass(frozen=True)
class SourceSettings:
    path: str = field(default="", metadata={"doc": (
        "A folder of images (recursive) or a metadata file (.jsonl, .csv, .parquet) with a path column.")})
    repeats: int = field(default=1, metadata={"doc": (
        "Times each image appears per epoch (kohya NN_name folders multiply this).")})
    weight: float = field(default=1.0, metadata={"doc": (
        "Multiplies repeats; fractions are rounded at random per epoch (0.5: about every other epoch).")})
    caption_extension: str = field(default=".txt", metadata={"doc": "Caption file extension (folders)."})
    missing_caption: Literal["skip", "empty"] = field(default="skip", metadata={"doc": (
        "An image without a caption: skip it (counted), or train it with an empty caption (plus any prefix).")})
    booru: bool = field(default=False, metadata={"doc": (
        "Build Kohaku-style captions from booru metadata (danbooru2023 fields) instead of caption text: a "
        "<image>.json beside each image in a folder, or the columns of a metadata file.")})
    image_root: str = field(default="", metadata={"doc": (
        "Metadata files: folder the image paths are relative to. Empty: the metadata file's folder.")})
    path_column: str = field(default="path", metadata={"doc": "Metadata column with the image path."})
    caption_columns: tuple[str, ...] = field(default=("caption",), metadata={"doc": (
        "Metadata columns joined (', ') into the caption; list-valued columns are joined too.")})
    captions: CaptionSettings = field(default_factory=CaptionSettings, metadata={"doc": (
        "Caption processors of this source.")})
    booru_tags: BooruSettings = field(default_factory=BooruSettings, metadata={"doc": (
        "Quality, year and rating tags of booru captions.")})


class Skips(Counter):
    """Skipped inputs by reason; in strict mode the first one raises."""

    def __init__(self, strict: bool):
        super().__init__()
        self.strict = strict

    def add(self, reason: str, where: object) -> None:
        if self.strict:
            raise DatasetError(f"{where}: {reason} (data.strict is on; fix or remove the file, or turn it off "
                               "to skip such files)")
        self[reason] += 1


def index_source(source: SourceSettings, skips: Skips) -> pa.Table:
    """The records of one source as a table with :data:`SCHEMA` (before cross-source de-duplication)."""
    path = Path(source.path)
    if path.is_dir():
        return _index_folder(path, source, skips)
    if path.is_file():
        return _index_metadata(path, source, skips)
    raise DatasetError(f"{path}: dataset source not found; set the source path to a folder of images or a "
                       ".jsonl / .csv / .parquet metadata file")


def cached_index(source: SourceSettings, cache_root: Path | None, strict: bool, trigger: str
                 ) -> tuple[pa.Table, Counter]:
    """``index_source`` plus the ``prepared`` captions (:func:`with_prepared_captions`), kept under
    ``cache_root/index`` and reused while the inputs' sizes, times, the settings and the trigger are unchanged
    (a folder is still listed; a metadata file is only stat'ed). In strict mode an index that skipped files is
    built again, so that the error names the first unusable file."""
    skips = Skips(strict)
    if cache_root is None:
        return with_prepared_captions(index_source(source, skips), source, trigger), Counter(skips)
    file = Path(cache_root) / "index" / f"{_source_key(source, trigger)}.arrow"
    if file.is_file():
        try:
            with pa.memory_map(str(file)) as mm:
                table = pa.ipc.open_file(mm).read_all()
            counts = Counter(json.loads(table.schema.metadata[b"skipped"]))
        except (pa.ArrowInvalid, OSError, KeyError, ValueError):
            counts = None  # a damaged cache entry is rebuilt
        if counts is not None and not (strict and counts):
            return table.replace_schema_metadata(None), counts
    table = with_prepared_captions(index_source(source, skips), source, trigger)
    _write_index(file, table, skips)
    return table, Counter(skips)


def with_prepared_captions(table: pa.Table, source: SourceSettings, trigger: str) -> pa.Table:
    """``table`` with a ``prepared`` column: each caption after the source's fixed processors, packed
    (:func:`~.captions.prepare_captions`). Computed once with the index, so a step runs only the per-step
    processors; CHUNK rows at a time, so a million captions never sit in memory as Python strings."""
    split = split_chain(source.captions.chain(trigger))
    natural = source.captions.format == "text"
    captions = table.column("caption")
    chunks = [pa.array(prepare_captions(captions.slice(start, CHUNK).to_pylist(), natural, split), pa.string())
              for start in range(0, table.num_rows, CHUNK)]
    return table.append_column("prepared", pa.chunked_array(chunks, pa.string()))


def _write_index(file: Path, table: pa.Table, skips: Counter) -> None:
    """Arrow IPC, streamed to a temporary file and renamed (atomic; no second copy of a large index)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(
                sink, table.schema.with_metadata({"skipped": json.dumps(dict(skips))})) as writer:
            writer.write_table(table)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(file.parent)


def _source_key(source: SourceSettings, trigger: str) -> str:
    settings = json.dumps([asdict(source), trigger], sort_keys=True)
    h = hashlib.sha256(f"{INDEX_VERSION}{settings}".encode())
    path = Path(source.path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ------------------------------------------------------------------ folders

def _index_folder(root: Path, source: SourceSettings, skips: Skips) -> pa.Table:
    rows: dict[str, list] = {name: [] for name in SCHEMA.names}
    sidecars: list[dict] = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        try:
            data = path.read_bytes()
            if not data:
                skips.add("empty file", path)
                continue
            with Image.open(path) as im:
                width, height = _upright_size(im)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
            skips.add("unreadable image", path)
            continue
        caption = _booru_sidecar(path, skips) if source.booru else _caption_file(path, source, skips)
        if caption is None:
            continue
        if source.booru:
            sidecars.append(caption)
            caption = ""
        rows["path"].append(str(path))
        rows["caption"].append(caption)
        rows["content"].append(hashlib.sha256(data).hexdigest())
        rows["width"].append(width)
        rows["height"].append(height)
        rows["repeats"].append(source.repeats * _folder_repeats(path, root))
    if source.booru:
        columns = {key: [record.get(key) for record in sidecars] for key in {k for r in sidecars for k in r}}
        rows["caption"] = kohaku_captions(columns, len(sidecars), source.booru_tags)
    return pa.table(rows, schema=SCHEMA)


def _upright_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) after the EXIF rotation that decoding applies (orientations 5-8 swap the sides)."""
    orientation = im.getexif().get(0x0112, 1)
    return (im.height, im.width) if orientation in (5, 6, 7, 8) else im.size


def _folder_repeats(path: Path, root: Path) -> int:
    for parent in path.relative_to(root).parents:
        match = REPEAT_FOLDER.match(parent.name)
        if match:
            return int(match.group(1))
    return 1


def _caption_file(path: Path, source: SourceSettings, skips: Skips) -> str | None:
    caption = path.with_suffix(source.caption_extension)
    try:
        return caption.read_text(encoding="utf-8-sig").strip()
    except FileNotFoundError:
        if source.missing_caption == "empty":
            return ""
        skips.add("missing caption", caption)
    except UnicodeDecodeError:
        skips.add("caption not UTF-8", caption)
    except OSError:
        skips.add("unreadable caption", caption)
    return None


def _booru_sidecar(path: Path, skips: Skips) -> dict | None:
    for candidate in (path.with_name(path.name + ".json"), path.with_suffix(".json")):
        if candidate.is_file():
            try:
                record = json.loads(candidate.read_text(encoding="utf-8-sig"))
            except (UnicodeDecodeError, json.JSONDecodeError, OSError):
                skips.add("unreadable booru metadata", candidate)
                return None
            if isinstance(record, dict):
                return record
            skips.add("unreadable booru metadata", candidate)
            return None
    skips.add("missing booru metadata", path)
    return None


# ------------------------------------------------------------------ metadata files

def read_metadata(path: Path) -> pa.Table:
    """A .jsonl / .json (one record per line), .csv or .parquet file as an Arrow table."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            import pyarrow.json as pj
            return pj.read_json(str(path))
        if suffix == ".csv":
            import pyarrow.csv as pc
            return pc.read_csv(str(path))
        if suffix == ".parquet":
            import pyarrow.parquet as pq
            return pq.read_table(str(path))
    except (pa.ArrowInvalid, OSError) as e:
        raise DatasetError(f"{path}: not a readable {suffix} metadata file ({e})") from None
    raise DatasetError(f"{path}: unknown metadata format; use .jsonl, .csv or .parquet")


def _index_metadata(path: Path, source: SourceSettings, skips: Skips) -> pa.Table:
    table = read_metadata(path)
    names = set(table.column_names)
    if source.path_column not in names:
        raise DatasetError(f"{path}: no column '{source.path_column}' with image paths (columns: "
                           f"{', '.join(sorted(names))}); set the source's path_column")
    missing = [c for c in source.caption_columns if c not in names]
    if missing and not source.booru:
        raise DatasetError(f"{path}: no caption column {missing[0]!r} (columns: {', '.join(sorted(names))}); "
                           "set the source's caption_columns")
    n = table.num_rows
    root = str(Path(source.image_root) if source.image_root else path.parent)
    relative = table.column(source.path_column).cast(pa.string())
    paths = pc.binary_join_element_wise(pa.scalar(root), relative, os.sep)
    hash_name = next((c for c in HASH_COLUMNS if c in names), None)
    content = (pc.binary_join_element_wise(pa.scalar(hash_name), table.column(hash_name).cast(pa.string()), ":")
               if hash_name else pa.nulls(n, pa.string()))
    width, height = _first_column(table, WIDTH_COLUMNS), _first_column(table, HEIGHT_COLUMNS)
    captions = pa.chunked_array(_captions(table, source), pa.string())
    keep = np.ones(n, dtype=bool)
    no_path = pc.fill_null(pc.equal(relative, ""), True).to_numpy(zero_copy_only=False)
    for i in np.flatnonzero(no_path):
        skips.add("no image path", f"{path} row {i}")
        keep[i] = False
    unknown = ~no_path & (pc.is_null(content).to_numpy(zero_copy_only=False) | (width <= 0) | (height <= 0))
    if unknown.any():  # not in the metadata: read the image header (and bytes for the hash) once here
        content = content.to_pylist()
        for i in np.flatnonzero(unknown):
            got = _probe(Path(paths[i].as_py()), skips)
            if got is None:
                keep[i] = False
            else:
                content[i], width[i], height[i] = got
    out = pa.table({"path": paths, "caption": captions, "content": content, "width": width, "height": height,
                    "repeats": np.full(n, float(source.repeats))}, schema=SCHEMA)
    return out.filter(pa.array(keep)) if not keep.all() else out


def _captions(table: pa.Table, source: SourceSettings) -> list[pa.Array]:
    """Caption text per row, built CHUNK rows at a time; booru quality is ranked over the whole table."""
    n, names, booru = table.num_rows, set(table.column_names), source.booru_tags
    if source.booru:
        wanted = [k for k in table.column_names if k.startswith("tag_string_")] + ["rating", "created_at"]
        ratings = [rating_name(r) for r in _column(table, "rating").to_pylist()]
        scores = pc.fill_null(_column(table, booru.score_column).cast(pa.float64()), 0).to_numpy()
        levels = quality_levels(ratings, scores, booru.quality_percentiles)
        del ratings
    out = []
    for start in range(0, n, CHUNK):
        part = table.slice(start, CHUNK)
        if source.booru:
            columns = {k: part.column(k).to_pylist() for k in wanted if k in names}
            text = kohaku_captions(columns, part.num_rows, booru, levels[start:start + CHUNK])
        else:
            text = _join_columns([part.column(c).to_pylist() for c in source.caption_columns])
        out.append(pa.array(text, pa.string()))
    return out


def _column(table: pa.Table, name: str) -> pa.ChunkedArray:
    return table.column(name) if name in table.column_names else pa.chunked_array([pa.nulls(table.num_rows)])


def _probe(path: Path, skips: Skips) -> tuple[str, int, int] | None:
    try:
        data = path.read_bytes()
        if not data:
            skips.add("empty file", path)
            return None
        with Image.open(path) as im:
            width, height = _upright_size(im)
    except FileNotFoundError:
        skips.add("missing image file", path)
        return None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        skips.add("unreadable image", path)
        return None
    return hashlib.sha256(data).hexdigest(), width, height


def _first_column(table: pa.Table, names: Sequence[str]) -> np.ndarray:
    """The first of ``names`` as int64 (0 where absent: the image header is read instead)."""
    for name in names:
        if name in table.column_names:
            return np.asarray(table.column(name).fill_null(0).to_numpy(), dtype=np.int64).copy()
    return np.zeros(table.num_rows, np.int64)


def _join_columns(columns: list[list]) -> list[str]:
    def text(value) -> str:
        if value is None:
            return ""
        return ", ".join(str(v) for v in value) if isinstance(value, list) else str(value)
    return [", ".join(t for t in (text(v) for v in values) if t) for values in zip(*columns)]
