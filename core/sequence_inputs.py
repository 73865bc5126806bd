"""The sequence model's per-event inputs, built the same way by training and by the gateway.

A user's behaviour is read as a time-ordered list of ``(item, event token, seconds)``. The
token says what the event was (its type, and whether it was positive), the gap bucket how
long after the previous event it came, the rank bucket how much history the user had by
then. Training cuts sequences from the event log; the gateway keeps the last
:data:`SEQUENCE_EVENTS` of each user on the Milvus user row (``events``) and turns them into
the model's left-padded inputs with :func:`model_inputs`. Item ids stay strings here: the
served model maps them to its own vocabulary (``model_repository/sequence_recommender``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from core.events import EVENT_TYPES

PAD = 0
#: event tokens: 0 = padding, then (type, negative/positive) pairs; unknown types -> "other"
TOKEN_TYPES = (*EVENT_TYPES, "other")
N_TOKENS = 1 + 2 * len(TOKEN_TYPES)
#: gap buckets: 0 = padding, 1 = first interaction, 2 = same second, 3 + floor(log2(seconds))
GAP_BUCKETS = 3 + 31
#: how much history the user had at a position: 0 = padding, 1 + floor(log2(1 + earlier))
RANK_BUCKETS = 1 + 17
#: the model's per-position inputs, in this order
INPUTS = ("items", "tokens", "gaps", "ranks")
#: events kept on a user row (the newest): at least any model's ``max_seq_len``
SEQUENCE_EVENTS = 100

_TOKEN_INDEX = {t: n for n, t in enumerate(TOKEN_TYPES)}


def event_tokens(event_types: Iterable[str], positive: Iterable[bool]) -> np.ndarray:
    """Event token per event: ``1 + 2 * type + positive`` (0 is padding)."""
    other = _TOKEN_INDEX["other"]
    types = np.array([_TOKEN_INDEX.get(str(t), other) for t in event_types], dtype=np.int64)
    pos = np.fromiter((bool(p) for p in positive), dtype=bool, count=len(types))
    return (1 + 2 * types + pos).astype(np.int64)


def gap_buckets(seconds: np.ndarray) -> np.ndarray:
    """Bucket of the gap to the previous interaction of one user (time-ordered seconds)."""
    out = np.ones(len(seconds), dtype=np.int64)  # the first interaction
    if len(seconds) > 1:
        gap = np.diff(np.asarray(seconds)).astype(np.float64)
        b = np.where(gap <= 0, 2, 3 + np.floor(np.log2(np.maximum(gap, 1.0))))
        out[1:] = np.minimum(b, GAP_BUCKETS - 1).astype(np.int64)
    return out


def rank_buckets(n: int, earlier: int = 0) -> np.ndarray:
    """Bucket of the number of earlier interactions of each of a user's ``n`` events (the
    first preceded by ``earlier``): tells a new user from a long history."""
    counts = earlier + np.arange(n)
    return 1 + np.minimum(np.floor(np.log2(1.0 + counts)), RANK_BUCKETS - 2).astype(np.int64)


def append_events(
    current: Mapping[str, Any] | None,
    events: Iterable[tuple[float, str, str, bool]],
    keep: int = SEQUENCE_EVENTS,
) -> dict[str, list[Any]]:
    """The user row's ``events`` after adding ``(seconds, item_id, event_type, positive)``:
    time order (an event older than the newest kept one is placed by its time), the newest
    ``keep``. Shape: ``{"items": [...], "tokens": [...], "seconds": [...]}``."""
    old = current or {}
    rows = list(
        zip(
            [int(s) for s in old.get("seconds", [])],
            [str(i) for i in old.get("items", [])],
            [int(t) for t in old.get("tokens", [])],
            strict=True,
        )
    )
    added = sorted(events, key=lambda e: e[0])
    tokens = event_tokens([e[2] for e in added], [e[3] for e in added])
    rows += [(int(e[0]), str(e[1]), int(t)) for e, t in zip(added, tokens, strict=True)]
    rows.sort(key=lambda r: r[0])  # stable: same-second events keep their arrival order
    rows = rows[-keep:]
    return {
        "items": [r[1] for r in rows],
        "tokens": [r[2] for r in rows],
        "seconds": [r[0] for r in rows],
    }


def model_inputs(
    events: Mapping[str, Sequence[Any]] | None, history_size: int, max_len: int
) -> dict[str, np.ndarray]:
    """Left-padded ``[1, max_len]`` inputs of a user row's ``events`` (``items`` as strings,
    the rest int64); ``history_size`` counts every event the user ever had, so the rank
    buckets of a row that kept only the newest events match training's."""
    ev = events or {}
    items = np.array([str(i) for i in ev.get("items", [])], dtype=object)
    out = {name: np.zeros((1, max_len), dtype=np.int64) for name in INPUTS}
    out["items"] = np.full((1, max_len), "", dtype=object)
    earlier = max(0, history_size - len(items))
    fill_inputs(out, 0, items, ev.get("tokens", []), ev.get("seconds", []), earlier)
    return out


def fill_inputs(
    out: Mapping[str, np.ndarray],
    row: int,
    items: np.ndarray,
    tokens: Sequence[int] | np.ndarray,
    seconds: Sequence[int] | np.ndarray,
    earlier: int = 0,
) -> None:
    """Write one user's newest events (time order, the first preceded by ``earlier`` others)
    right-aligned into ``row`` of the ``[users, max_len]`` arrays of :data:`INPUTS` (left
    padding stays as it is): the one place that turns events into the model's inputs."""
    n = len(items)
    m = min(n, out["items"].shape[1])
    if not m:
        return
    # gaps over every event given, so the first input's gap is real when there are more
    # events than the model reads (a row keeps SEQUENCE_EVENTS > max_len)
    gaps = gap_buckets(np.asarray(seconds, dtype=np.int64))
    width = out["items"].shape[1]
    out["items"][row, width - m :] = items[-m:]
    out["tokens"][row, width - m :] = np.asarray(tokens, dtype=np.int64)[-m:]
    out["gaps"][row, width - m :] = gaps[-m:]
    out["ranks"][row, width - m :] = rank_buckets(n, earlier)[-m:]


def user_event_sequences(
    events: pd.DataFrame, keep: int = SEQUENCE_EVENTS
) -> dict[str, dict[str, list[Any]]]:
    """Each user's row ``events`` from an event log (``user_id``, ``item_id``,
    ``event_type``, ``weight``, ``timestamp``): the newest ``keep`` in time order, ties in
    file order, as training reads sequences."""
    if events.empty:
        return {}
    seconds = pd.to_datetime(events["timestamp"], utc=True).dt.tz_localize(None)
    frame = pd.DataFrame(
        {
            "user": events["user_id"].astype(str).to_numpy(),
            "item": events["item_id"].astype(str).to_numpy(),
            "token": event_tokens(events["event_type"], events["weight"].to_numpy() > 0),
            "s": seconds.to_numpy(dtype="datetime64[s]").astype(np.int64),
        }
    )
    frame = frame.sort_values(["user", "s"], kind="stable").groupby("user", sort=False).tail(keep)
    return {
        str(user): {
            "items": group["item"].tolist(),
            "tokens": [int(t) for t in group["token"]],
            "seconds": [int(s) for s in group["s"]],
        }
        for user, group in frame.groupby("user", sort=False)
    }
