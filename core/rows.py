"""Typed rows of the Milvus collections, each built in one function.

The offline indexing jobs, the gateway's ``UpsertItems`` and the profile updates all write
rows through these builders, so a row written by any of them has the same fields and is cut
to the same schema limits (:mod:`core.milvus_schema`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, NotRequired, TypedDict

import numpy as np

from core.milvus_schema import (
    CATEGORY_MAX_LENGTH,
    CO_ITEMS,
    MAX_CATEGORIES,
    RECENT_ITEMS,
    SEEN_ITEMS,
    SEGMENT_POPULAR,
    TEXT_MAX_LENGTH,
    TITLE_MAX_LENGTH,
)

Vector = Sequence[float] | np.ndarray


class ItemRow(TypedDict):
    """A catalogue item: its text fields, behaviour signals and item-tower vector."""

    item_id: str
    title: str
    categories: list[str]
    text: str
    popularity: float  # time-decayed positive users
    created_at: int  # epoch seconds; 0 when unknown
    co_items: list[str]  # co-occurrence neighbours, best first
    vector: NotRequired[list[float]]


class UserRow(TypedDict):
    """A user profile: segment, interests, histories and the user vector."""

    user_id: str
    segment: str
    interests: dict[str, float]
    recent_items: list[str]  # positives, most recent first
    seen_items: list[str]  # every item with any event, newest first
    history_size: int
    updated_at: int  # epoch milliseconds
    version: int  # event-log sequence of the newest event folded in (0: none)
    events: dict[str, list[Any]]  # newest events, time order (core.sequence_inputs)
    vector: NotRequired[list[float]]


class SegmentRow(TypedDict):
    """A user segment: its unit-norm centroid and its popular items."""

    segment_id: str
    vector: list[float]
    popular_items: list[str]
    size: int


def cut_utf8(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` UTF-8 bytes, never inside a character.

    A Milvus server's VARCHAR ``max_length`` counts bytes (Milvus Lite counts characters, a
    laxer rule): a cut by characters leaves multibyte text (accents, CJK, emoji) too long,
    and the whole write is refused."""
    data = text.encode("utf-8", "replace")  # a lone surrogate cannot be stored: "?"
    # A prefix of valid UTF-8 is valid but for a character split at its end: "ignore" drops it.
    return data[:max_bytes].decode("utf-8", "ignore")


def _as_list(vector: Vector) -> list[float]:
    out: list[float] = np.asarray(vector, dtype=np.float32).tolist()
    return out


def item_row(
    item_id: str,
    title: str,
    categories: Sequence[str],
    text: str,
    *,
    popularity: float = 0.0,
    created_at: int = 0,
    co_items: Sequence[str] = (),
    vector: Vector | None = None,
) -> ItemRow:
    """An item row cut to the schema's limits, in UTF-8 bytes as Milvus counts them (the full
    text may have been embedded)."""
    row = ItemRow(
        item_id=str(item_id),
        title=cut_utf8(str(title), TITLE_MAX_LENGTH),
        categories=[
            cut_utf8(str(c), CATEGORY_MAX_LENGTH) for c in list(categories)[:MAX_CATEGORIES]
        ],
        text=cut_utf8(str(text), TEXT_MAX_LENGTH),
        popularity=float(popularity),
        created_at=int(created_at),
        co_items=[str(i) for i in list(co_items)[:CO_ITEMS]],
    )
    if vector is not None:
        row["vector"] = _as_list(vector)
    return row


def user_row(
    user_id: str,
    *,
    segment: str,
    interests: Mapping[str, float],
    recent_items: Sequence[str],
    seen_items: Sequence[str],
    history_size: int,
    events: Mapping[str, Sequence[Any]] | None = None,
    updated_at: int | None = None,
    vector: Vector | None = None,
    version: int = 0,
) -> UserRow:
    """A user row; ``updated_at`` defaults to now (epoch milliseconds), ``events`` to none
    (:func:`core.sequence_inputs.append_events` builds it), ``version`` (the event-log
    sequence of the newest event folded in, which the profile worker compares) to 0."""
    row = UserRow(
        user_id=str(user_id),
        segment=segment,
        interests=dict(interests),
        recent_items=list(recent_items)[:RECENT_ITEMS],
        seen_items=list(seen_items)[:SEEN_ITEMS],
        history_size=int(history_size),
        updated_at=int(time.time() * 1000) if updated_at is None else int(updated_at),
        version=int(version),
        events={
            k: list(v) for k, v in (events or {"items": [], "tokens": [], "seconds": []}).items()
        },
    )
    if vector is not None:
        row["vector"] = _as_list(vector)
    return row


def segment_row(
    segment_id: str, centroid: Vector, popular_items: Sequence[str], size: int
) -> SegmentRow:
    """A segment row: centroid, its most popular items (cut to the schema) and its size."""
    return SegmentRow(
        segment_id=segment_id,
        vector=_as_list(centroid),
        popular_items=list(popular_items)[:SEGMENT_POPULAR],
        size=int(size),
    )
