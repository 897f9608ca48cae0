"""Booru metadata (danbooru2023-style records) → Kohaku-style captions with quality, year and rating tags.

A record has space-separated tag strings ``tag_string_general`` / ``_character`` / ``_copyright`` / ``_artist`` /
``_meta``, a ``rating`` (g/s/q/e or the full words), ``fav_count`` (or ``score``) and ``created_at``. The
caption follows the Kohaku XL order, in the sections the caption processors understand::

    <1girl/1boy/...>, <character>, <series>, <artists> ||| <general tags> ||| <quality>, <year>, <meta>, <rating>
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .captions import SECTION_SEPARATOR

QUALITY_TAGS = ("masterpiece", "best quality", "great quality", "good quality", "normal quality", "low quality",
                "worst quality")
RATING_TAGS = {"general": ("safe",), "sensitive": ("sensitive",), "questionable": ("nsfw",),
               "explicit": ("nsfw", "explicit")}
RATING_NAMES = {"g": "general", "s": "sensitive", "q": "questionable", "e": "explicit"}
# Kohaku XL's table, with the newest range left open so later uploads are tagged too.
DEFAULT_YEAR_TAGS: tuple[tuple[int, int, str], ...] = (
    (0, 2010, "old"), (2011, 2014, "early"), (2015, 2017, "mid"), (2018, 2020, "recent"), (2021, 9999, "newest"))
PEOPLE = re.compile(r"^(\d\+?|multiple)_?(girl|boy|other)s?$|^no_humans$")


@dataclass(frozen=True)
class BooruSettings:
    quality_percentiles: tuple[float, ...] = field(default=(90.0, 75.0, 60.0, 45.0, 30.0, 10.0), metadata={"doc": (
        "fav_count percentiles within each rating that separate the 7 quality tags, highest first.")})
    year_tags: tuple[tuple[int, int, str], ...] = field(default=DEFAULT_YEAR_TAGS, metadata={"doc": (
        "Year tags from the upload year: [[first_year, last_year, tag], ...].")})
    score_column: str = field(default="fav_count", metadata={"doc": "Column ranked for the quality tags."})
    meta_tags: bool = field(default=True, metadata={"doc": "Keep the meta tags (highres, ...) in the tail."})


def rating_name(value: Any) -> str:
    text = str(value or "").strip().lower()
    return RATING_NAMES.get(text, text)


def quality_levels(ratings: Sequence[str], scores: Sequence[float],
                   percentiles: Sequence[float] = (90, 75, 60, 45, 30, 10)) -> np.ndarray:
    """Quality level per record, 0 (masterpiece) .. len(percentiles) (worst), ranked within its rating.

    A record at or above the rating's 90th percentile of ``scores`` is level 0, at or above the 75th level 1,
    and so on; below the last threshold is the last level. Percentiles use numpy's linear interpolation.
    """
    ratings = np.asarray(ratings, dtype=object)
    scores = np.asarray(scores, dtype=np.float64)
    levels = np.full(len(scores), len(percentiles), dtype=np.int8)
    for rating in np.unique(ratings):
        mask = ratings == rating
        thresholds = np.percentile(scores[mask], percentiles)
        # For descending thresholds, the level is the number of thresholds the score does not reach.
        levels[mask] = (scores[mask][:, None] < thresholds[None, :]).sum(axis=1)
    return levels


def year_tag(year: int, table: Sequence[Sequence[Any]] = DEFAULT_YEAR_TAGS) -> str:
    for first, last, tag in table:
        if first <= year <= last:
            return tag
    return ""


def created_year(value: Any) -> int:
    """The year of ``created_at`` (ISO text such as 2021-03-04T..., or a Unix time); 0 when unknown."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(np.datetime64(int(value), "s").astype("datetime64[Y]").astype(int) + 1970)
    match = re.match(r"\s*(\d{4})", str(value or ""))
    return int(match.group(1)) if match else 0


def kohaku_caption(record: Mapping[str, Any], quality: int, settings: BooruSettings = BooruSettings()) -> str:
    """The sectioned caption of one record (tags keep their underscores: the processors convert them)."""
    def tags(key: str) -> list[str]:
        return str(record.get(f"tag_string_{key}") or "").split()

    general = tags("general")
    people = [t for t in general if PEOPLE.match(t)]
    head = people + tags("character") + tags("copyright") + tags("artist")
    body = [t for t in general if not PEOPLE.match(t)]
    tail = [QUALITY_TAGS[min(quality, len(QUALITY_TAGS) - 1)]]
    year = year_tag(created_year(record.get("created_at")), settings.year_tags)
    tail += [year] if year else []
    tail += tags("meta") if settings.meta_tags else []
    tail += list(RATING_TAGS.get(rating_name(record.get("rating")), ()))
    return f" {SECTION_SEPARATOR} ".join(", ".join(part) for part in (head, body, tail))


def kohaku_captions(columns: Mapping[str, Sequence[Any]], count: int,
                    settings: BooruSettings = BooruSettings()) -> list[str]:
    """Captions of ``count`` records given column-wise (absent columns are empty): quality is ranked over
    these records, within each rating. Column-wise so a million records never become a million dicts."""
    def column(name: str) -> Sequence[Any]:
        return columns.get(name) or [None] * count

    names = [n for n in columns if n.startswith("tag_string_")] + ["rating", "created_at"]
    ratings = [rating_name(r) for r in column("rating")]
    scores = [float(s or 0) for s in column(settings.score_column)]
    levels = quality_levels(ratings, scores, settings.quality_percentiles)
    rows = zip(*(column(n) for n in names))
    return [kohaku_caption(dict(zip(names, row)), int(q), settings) for row, q in zip(rows, levels)]
