"""Loader for the MovieLens ``ml-latest-*`` layout (``ratings.csv``, ``movies.csv`` and the
optional ``tags.csv``; CRLF or LF line endings).

* ratings become ``event_type="rating"`` events with ``value`` = the star rating; the
  implicit weight follows :class:`~core.events.ImplicitRule`.
* movies: ``genres`` split on ``|`` (``"(no genres listed)"`` -> ``[]``); titles of the form
  ``"Matrix, The (1999)"`` are turned into ``"The Matrix (1999)"`` so the language model reads
  natural text; ``created_at`` is 1 January of the year in the title (NaT without a year).
* tags (free text users attached to movies) become the item ``text``: ``"Tags: a, b"``, most
  frequent first (ties: first seen), case-insensitively de-duplicated, at most ``max_tags``.
  Tag rows for unknown movies are reported as malformed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from core.events import ImplicitRule
from core.text import normalize_text
from training.data.cleaning import (
    DEFAULT_NEAR_DUPLICATE_WINDOW,
    clean_events,
    clean_ids,
    clean_items,
)
from training.data.io import LINE, read_table
from training.data.schema import Dataset, LoadReport

_ARTICLE = re.compile(r"^(?P<name>.+), (?P<art>The|A|An)(?P<rest>(?: \([^()]*\))*)$")
_YEAR = re.compile(r"\((\d{4})(?:[-\u2013]\d{0,4})?\)\s*$")


def fix_title(title: str) -> str:
    """``"Matrix, The (1999)"`` -> ``"The Matrix (1999)"``; other titles unchanged."""
    m = _ARTICLE.match(title)
    return f"{m['art']} {m['name']}{m['rest']}" if m else title


def title_year(title: str) -> int | None:
    m = _YEAR.search(title)
    return int(m.group(1)) if m else None


def load_movielens(
    path: str | Path,
    *,
    rule: ImplicitRule = ImplicitRule(),  # noqa: B008 - frozen dataclass
    near_duplicate_window: pd.Timedelta | None = DEFAULT_NEAR_DUPLICATE_WINDOW,
    max_tags: int = 10,
) -> Dataset:
    """Load a MovieLens directory into a cleaned :class:`Dataset`."""
    root = Path(path)
    report = LoadReport()
    movies_raw = read_table(
        root / "movies.csv",
        required=["item_id", "title", "categories"],
        rename={"movieid": "item_id", "genres": "categories"},
        report=report,
        counter_prefix="items",
    )
    movies_raw["title"] = movies_raw["title"].map(lambda t: fix_title(normalize_text(t)))
    years = [title_year(t) for t in movies_raw["title"]]
    movies_raw["created_at"] = [f"{y:04d}-01-01" if y else "" for y in years]
    items = clean_items(movies_raw, file="movies.csv", report=report)

    tags_file = root / "tags.csv"
    if tags_file.exists():
        tags_raw = read_table(
            tags_file,
            required=["user_id", "item_id", "tag"],
            optional=["timestamp"],
            rename={"userid": "user_id", "movieid": "item_id"},
            report=report,
            counter_prefix="tags",
        )
        text = _tag_text(tags_raw, set(items["item_id"]), report, max_tags)
        items["text"] = items["item_id"].map(text).fillna("").astype(object)

    ratings_raw = read_table(
        root / "ratings.csv",
        required=["user_id", "item_id", "value", "timestamp"],
        rename={"userid": "user_id", "movieid": "item_id", "rating": "value"},
        report=report,
        counter_prefix="events",
    )
    ratings_raw.insert(2, "event_type", "rating")
    events = clean_events(
        ratings_raw,
        file="ratings.csv",
        known_items=set(items["item_id"]),
        report=report,
        rule=rule,
        near_duplicate_window=near_duplicate_window,
    )
    return Dataset(events=events, items=items, report=report)


def _tag_text(
    tags: pd.DataFrame, known: set[str], report: LoadReport, max_tags: int
) -> dict[str, str]:
    tags = tags.assign(item_id=clean_ids(tags["item_id"]), tag=tags["tag"].map(normalize_text))
    empty = tags["tag"] == ""
    for line in tags.loc[empty, LINE]:
        report.add_malformed("tags.csv", int(line), "empty tag")
    unknown = ~empty & ~tags["item_id"].isin(known)
    for line, iid in zip(tags.loc[unknown, LINE], tags.loc[unknown, "item_id"], strict=True):
        report.add_malformed("tags.csv", int(line), f"unknown item_id: {iid!r}")
    tags = tags[~empty & ~unknown]
    report.counts["tags_kept"] += len(tags)
    tags = tags.assign(key=tags["tag"].str.lower(), order=range(len(tags)))
    stats = tags.groupby(["item_id", "key"], sort=False).agg(
        n=("order", "size"), first=("order", "min"), tag=("tag", "first")
    )
    stats = stats.reset_index().sort_values(
        ["item_id", "n", "first"], ascending=[True, False, True]
    )
    out: dict[str, str] = {}
    for iid, grp in stats.groupby("item_id", sort=False):
        out[str(iid)] = "Tags: " + ", ".join(grp["tag"].head(max_tags))
    return out
