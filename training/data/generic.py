"""Loader for the generic format any user can produce (CSV or Parquet, chosen by suffix).

``events`` file (a Parquet "file" may be a directory of part files with one schema, as
``ops.export_events`` writes from the events stream) - required columns ``user_id, item_id,
event_type, timestamp``; optional
``value`` (a rating for ``rating`` events, any number otherwise). ``event_type`` is one of
``view, click, rating, purchase`` (aliases such as ``buy``/``rate`` are accepted, and a
music log's ``play``/``listen`` count as clicks, see
:data:`~training.data.schema.EVENT_TYPE_ALIASES`). ``timestamp``: epoch seconds/ms/us/ns or
ISO 8601 text (naive = UTC) or a Parquet timestamp column.

``items`` file - required ``item_id``; optional ``title``, ``categories`` (CSV: ``|``-separated
string; Parquet: list<string> or ``|``-separated string), ``created_at``; every other column is
free text joined into ``text`` (``text``/``description`` verbatim, others as
``"<Column>: <value>"``), or only the columns named in ``text_columns``.

Column names are case-insensitive. Example CSVs::

    user_id,item_id,event_type,timestamp,value
    u1,i9,purchase,2024-05-01T10:00:00Z,
    u1,i3,rating,1714557600,4.5

    item_id,title,categories,description
    i9,Trail shoe,Shoes|Running,"Light, grippy"
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from core.events import ImplicitRule
from training.data.cleaning import DEFAULT_NEAR_DUPLICATE_WINDOW, clean_events, clean_items
from training.data.io import LINE, read_table
from training.data.schema import Dataset, LoadReport

_ITEM_FIXED = ("item_id", "title", "categories", "created_at")


def load_generic(
    events_path: str | Path,
    items_path: str | Path,
    *,
    rule: ImplicitRule = ImplicitRule(),  # noqa: B008 - frozen dataclass
    near_duplicate_window: pd.Timedelta | None = DEFAULT_NEAR_DUPLICATE_WINDOW,
    text_columns: Sequence[str] | None = None,
    category_sep: str = "|",
) -> Dataset:
    """Load generic events + items files into a cleaned :class:`Dataset`."""
    events_path, items_path = Path(events_path), Path(items_path)
    report = LoadReport()
    items_raw = read_table(
        items_path,
        required=["item_id"],
        optional=["title", "categories", "created_at"],
        rename={"id": "item_id", "name": "title", "category": "categories", "genres": "categories"},
        report=report,
        counter_prefix="items",
        keep_extra=True,
    )
    extra = [c for c in items_raw.columns if c not in _ITEM_FIXED and c != LINE]
    cols = [c.lower() for c in text_columns] if text_columns is not None else extra
    missing = [c for c in cols if c not in items_raw.columns]
    if missing:
        raise ValueError(f"{items_path}: text column(s) {missing} not found")
    items = clean_items(
        items_raw,
        file=items_path.name,
        report=report,
        text_columns=cols,
        category_sep=category_sep,
    )
    events_raw = read_table(
        events_path,
        required=["user_id", "item_id", "event_type", "timestamp"],
        optional=["value"],
        rename={
            "user": "user_id",
            "item": "item_id",
            "event": "event_type",
            "type": "event_type",
            "ts": "timestamp",
            "time": "timestamp",
            "rating": "value",
        },
        report=report,
        counter_prefix="events",
    )
    events = clean_events(
        events_raw,
        file=events_path.name,
        known_items=set(items["item_id"]),
        report=report,
        rule=rule,
        near_duplicate_window=near_duplicate_window,
    )
    return Dataset(events=events, items=items, report=report)
