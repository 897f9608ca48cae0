"""Booru metadata (danbooru2023-style records) → Kohaku-style captions with quality, year and rating tags.

A record has space-separated tag strings ``tag_string_general`` / ``_character`` / ``_copyright`` / ``_artist`` /
``_meta``, a ``rating`` (g/s/q/e or the full words), ``fav_count`` (or ``score``) and ``created_at``. The
caption follows the Kohaku XL order, in the sections the caption processors understand::

    <1girl/1boy/...>, <character>, <series>, <artists> ||| <general tags> ||| <quality>, <year>, <meta>, <rating>
"""

from __future__ import annotations

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
# Danbooru's people-count tags, which Kohaku puts first.
PEOPLE = frozenset([f"{n}{kind}{'s' if n != '1' else ''}" for n in ("1", "2", "3", "4", "5", "6+")
                    for kind in ("girl", "boy", "other")]
                   + [f"multiple_{kind}s" for kind in ("girl", "boy", "other")] + ["no_humans"])


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
    text = str(value or "").strip()[:4]
    return int(text) if len(text) == 4 and text.isdigit() else 0


def kohaku_captions(columns: Mapping[str, Sequence[Any]], count: int, settings: BooruSettings = BooruSettings(),
                    levels: Sequence[int] | None = None) -> list[str]:
    """Sectioned captions of ``count`` records given column-wise (absent columns are empty); tags keep their
    underscores (the processors convert them). Quality ``levels`` default to ranking these records within
    each rating (pass them when the records are a chunk of a larger set). Column-wise so a million records
    never become a million dicts."""
    def column(name: str) -> Sequence[Any]:
        return columns.get(name) or [None] * count

    ratings = [rating_name(r) for r in column("rating")]
    if levels is None:
        scores = [float(s or 0) for s in column(settings.score_column)]
        levels = quality_levels(ratings, scores, settings.quality_percentiles)
    levels = [int(q) for q in levels]
    years: dict[int, str] = {}
    separator = f" {SECTION_SEPARATOR} "
    out = []
    for general, character, copyright_, artist, meta, rating, created, level in zip(
            column("tag_string_general"), column("tag_string_character"), column("tag_string_copyright"),
            column("tag_string_artist"), column("tag_string_meta"), ratings, column("created_at"), levels):
        tags = (general or "").split()
        head = [t for t in tags if t in PEOPLE]
        head += (character or "").split() + (copyright_ or "").split() + (artist or "").split()
        tail = [QUALITY_TAGS[min(level, len(QUALITY_TAGS) - 1)]]
        year = created_year(created)
        if year not in years:
            years[year] = year_tag(year, settings.year_tags)
        tail += [years[year]] if years[year] else []
        tail += (meta or "").split() if settings.meta_tags else []
        tail += RATING_TAGS.get(rating, ())
        body = ", ".join(t for t in tags if t not in PEOPLE)
        out.append(separator.join((", ".join(head), body, ", ".join(tail))))
    return out
