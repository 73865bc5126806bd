"""User profiles: history, interests and the user vector, kept on the Milvus user row.

Ingested events go through the same implicit-feedback rule as training data. Positives move
to the front of the user's history; interests are recomputed with time decay; the vector is
re-encoded by the user tower on Triton from the behaviour text, exactly as offline indexing
does, so an online profile and an indexed one are the same function of the history.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.behaviour import interests, merge_seen
from core.events import ImplicitRule
from core.milvus_schema import RECENT_ITEMS, SEEN_ITEMS
from core.rows import UserRow, user_row
from core.sequence_inputs import append_events
from core.text import user_text
from services.api import pb
from services.deadline import Deadline
from services.inference.triton_client import TritonClient
from services.vectors.store import Row, VectorStore, row_version

EVENT_NAMES = {
    pb.EVENT_TYPE_VIEW: "view",
    pb.EVENT_TYPE_CLICK: "click",
    pb.EVENT_TYPE_RATING: "rating",
    pb.EVENT_TYPE_PURCHASE: "purchase",
}


@dataclass(frozen=True)
class ProfileUpdate:
    """What applying a batch of events changed."""

    users: int
    positives: int
    interim: tuple[str, ...] = ()  # users written with the history-mean vector (stale)


class Profiles:
    """Reads and updates user rows; the Deadline-aware half of the gateway's profiling."""

    def __init__(
        self,
        store: VectorStore,
        triton: TritonClient,
        history_window: int,
        rule: ImplicitRule | None = None,
    ) -> None:
        self.store = store
        self.triton = triton
        self.history_window = history_window
        self.rule = rule or ImplicitRule()

    def get(self, user_id: str, timeout: float, with_vector: bool = True) -> Row | None:
        return self.store.get_user(user_id, timeout, with_vector)

    def get_many(
        self, user_ids: Sequence[str], timeout: float, with_vector: bool = True
    ) -> dict[str, Row]:
        """Many users' rows in one query (the worker's batch read)."""
        return self.store.get_users(user_ids, timeout, with_vector)

    def positive_weights(self, events: Sequence[pb.Event]) -> list[float]:
        types = pd.Series([EVENT_NAMES[e.event_type] for e in events], dtype=object)
        values = pd.Series([e.value if e.value else float("nan") for e in events], dtype=float)
        return [float(w) for w in self.rule.weights(types, values)]

    def apply(
        self,
        events: Sequence[pb.Event],
        deadline: Deadline,
        versions: Mapping[str, int] | None = None,
        current: Mapping[str, Row | None] | None = None,
        encode: Callable[[str], bool] | None = None,
    ) -> ProfileUpdate:
        """Fold events into their users' rows and re-encode the changed users.

        ``versions`` (user id -> the event-log sequence of the user's newest event here) is
        written on each row, so that the profile worker knows what a row already contains;
        users not named keep their row's version. ``current``: the users' rows as the caller
        just read them (not read again). ``encode(user)`` False keeps the row's vector and
        segment (the caller re-encodes later, :meth:`reencoded`: BERT is most of an apply's
        cost); a new user (no row yet) then gets the history's mean item vector
        (:func:`_mean_vector`, named in ``ProfileUpdate.interim`` for the caller to
        re-encode), and only a user without any catalogue item in the history is encoded
        now (the one text of an empty history). Encoding every new user now capped a
        profile worker at ~45 new users/s (16 per Triton request, one request at a time)."""
        rows_of: dict[str, Row | None] = {}
        for user_id in dict.fromkeys(e.user_id for e in events):
            if current is not None and user_id in current:
                rows_of[user_id] = current[user_id]
            else:
                rows_of[user_id] = self.get(
                    user_id, deadline.left(), with_vector=encode is not None
                )
        later = {u: encode is not None and not encode(u) for u in rows_of}
        rows, interim, encode_now, positives = self._fold(
            events, rows_of, versions or {}, later, deadline
        )
        if interim:
            self._place([r for r, _ in interim], np.stack([v for _, v in interim]), deadline)
        self._encode([r for r, _ in encode_now], [text for _, text in encode_now], deadline)
        self.store.upsert_users(rows, deadline.left())
        ids = tuple(r["user_id"] for r, _ in interim)
        return ProfileUpdate(users=len(rows), positives=positives, interim=ids)

    def merged(
        self,
        row: Row | None,
        events: Sequence[tuple[int, pb.Event]],
        deadline: Deadline,
        with_vector: bool = True,
    ) -> Row:
        """``row`` (None: a user without one) with one user's events folded in as the next
        apply will write them: history, seen items, counts, sequence events, interests and
        ``version`` (the newest event's log sequence); nothing is written. The vector and the
        segment are the row's (the next apply keeps them too; no vector when it was read
        without); a new user's are its history's mean item vector and that vector's nearest
        segment, as its first apply writes them (none when no history item is in the
        catalogue).

        What a reader merges from the event log's events that the profile workers have not
        applied yet, so that a profile is current as soon as its events are acknowledged,
        however far behind the workers are."""
        user_id = events[0][1].user_id
        later = {user_id: True}
        rows, interim, _, _ = self._fold(
            [e for _, e in events], {user_id: row}, {user_id: events[-1][0]}, later, deadline
        )
        if interim:  # a new user: the vector and segment its first apply places
            self._place([interim[0][0]], interim[0][1][None, :], deadline)
        out: Row = dict(rows[0])
        if not with_vector:
            out.pop("vector", None)
        return out

    def _fold(
        self,
        events: Sequence[pb.Event],
        rows_of: Mapping[str, Row | None],
        versions: Mapping[str, int],
        later: Mapping[str, bool],
        deadline: Deadline,
    ) -> tuple[list[UserRow], list[tuple[UserRow, np.ndarray]], list[tuple[UserRow, str]], int]:
        """The users' new rows (events folded into ``rows_of``), those to give an interim
        vector (with it), those to encode now (with their behaviour text), and the number of
        positives. ``later[user]``: the vector is encoded later (a row's kept, a new user's
        interim)."""
        weights = self.positive_weights(events)
        by_user: dict[str, list[tuple[float, str, float, str]]] = defaultdict(list)
        for event, weight in zip(events, weights, strict=True):
            ts = event.event_time.ToSeconds() if event.HasField("event_time") else time.time()
            by_user[event.user_id].append(
                (ts, event.item_id, weight, EVENT_NAMES[event.event_type])
            )
        rows: list[UserRow] = []
        encode_now: list[tuple[UserRow, str]] = []  # and its behaviour text
        interim: list[tuple[UserRow, np.ndarray]] = []  # and its history's mean item vector
        positives = 0
        folded: list[tuple[str, list[tuple[float, str, float, str]], Row | None, list[str]]] = []
        for user_id, user_events in by_user.items():
            row = rows_of[user_id]
            history = list(row["recent_items"]) if row else []
            for _, item_id, weight, _ in sorted(user_events):  # oldest first, newest ends in front
                if weight > 0:
                    positives += 1
                    history = [item_id, *[h for h in history if h != item_id]]
            folded.append((user_id, user_events, row, history[:RECENT_ITEMS]))
        # a new user encoded later: its interim vector's item vectors come with the same read
        vectorless = any(later[u] and row is None for u, _, row, _ in folded)
        windows = self._windows([h for _, _, _, h in folded], deadline, with_vectors=vectorless)
        for (user_id, user_events, row, history), items in zip(folded, windows, strict=True):
            pairs = _pairs(items)
            newest_first = [e[1] for e in sorted(user_events, reverse=True)]
            seen = merge_seen(newest_first, row["seen_items"] if row else [], SEEN_ITEMS)
            rows.append(
                user_row(
                    user_id,
                    segment=row["segment"] if row else "",
                    interests=interests(pairs),
                    recent_items=history,
                    seen_items=seen,
                    history_size=(row["history_size"] if row else 0) + len(user_events),
                    events=append_events(
                        row.get("events") if row else None,
                        [(ts, item, kind, weight > 0) for ts, item, weight, kind in user_events],
                    ),
                    version=versions.get(user_id, row_version(row)),
                )
            )
            if later[user_id] and row is not None:
                if _has_vector(row):  # re-encoded later; a row read without it stays so
                    kept = np.asarray(row["vector"], dtype=np.float32)
                    rows[-1]["vector"] = kept.tolist()
            elif later[user_id] and (mean := _mean_vector(items)) is not None:
                interim.append((rows[-1], mean))
            else:
                encode_now.append((rows[-1], user_text(pairs)))
        return rows, interim, encode_now, positives

    def reencoded(self, rows: Sequence[Row], deadline: Deadline) -> list[UserRow]:
        """The users of ``rows`` re-encoded from their history exactly as :meth:`apply`
        encodes (everything else kept), not written: the caller writes them if the rows did
        not change meanwhile (the profile worker encodes outside the user's lease)."""
        out: list[UserRow] = []
        texts: list[str] = []
        histories = [list(row["recent_items"]) for row in rows]
        windows = self._windows(histories, deadline)
        for row, history, items in zip(rows, histories, windows, strict=True):
            pairs = _pairs(items)
            out.append(
                user_row(
                    row["user_id"],
                    segment=row["segment"],
                    interests=interests(pairs),
                    recent_items=history,
                    seen_items=list(row["seen_items"]),
                    history_size=int(row["history_size"]),
                    events=row.get("events"),
                    version=row_version(row),
                )
            )
            texts.append(user_text(pairs))
        self._encode(out, texts, deadline)
        return out

    def _windows(
        self, histories: Sequence[Sequence[str]], deadline: Deadline, with_vectors: bool = False
    ) -> list[list[Row]]:
        """The catalogue rows of each history's newest ``history_window`` items (those not in
        the catalogue left out): what a user's interests, behaviour text and interim vector
        are made of, the same for an apply and a re-encode. One item read for all."""
        windows = [list(history[: self.history_window]) for history in histories]
        known = self.store.get_items(
            [i for w in windows for i in w], deadline.left(), with_vectors=with_vectors
        )
        return [[known[i] for i in window if i in known] for window in windows]

    def _encode(self, rows: Sequence[UserRow], texts: Sequence[str], deadline: Deadline) -> None:
        """The user tower's vectors (one Triton request, each distinct text once) and the
        nearest segment of each."""
        if not rows:
            return
        position = {text: i for i, text in enumerate(dict.fromkeys(texts))}
        encoded = self.triton.embed_users(list(position), deadline.left())
        vectors = encoded[[position[t] for t in texts]]
        self._place(rows, vectors, deadline)

    def _place(self, rows: Sequence[UserRow], vectors: np.ndarray, deadline: Deadline) -> None:
        """Set each row's vector and its nearest segment (the online assignment)."""
        segments = self._nearest_segments(vectors, deadline)
        for row, vector, segment in zip(rows, vectors, segments, strict=True):
            row["segment"] = row["segment"] if segment is None else segment
            row["vector"] = vector.tolist()

    def _nearest_segments(self, vectors: np.ndarray, deadline: Deadline) -> list[str | None]:
        """The nearest segment of each vector (None: no segments yet), one search for all
        (a search per user was a round trip per re-encoded user)."""
        found = self.store.nearest_segments(vectors, deadline.left())
        return [str(s["segment_id"]) if s else None for s in found]


def _pairs(items: Sequence[Row]) -> list[tuple[str, list[str]]]:
    """(title, categories) of each item: what interests and the behaviour text read."""
    return [(item["title"], item["categories"]) for item in items]


def _has_vector(row: Row | None) -> bool:
    return row is not None and row.get("vector") is not None and len(row["vector"]) > 0


def _mean_vector(items: Sequence[Row]) -> np.ndarray | None:
    """The unit mean of the items' vectors (None: no item). Items and users share the space
    the ANN searches, so this serves a new user until the user tower's vector replaces it."""
    if not items:
        return None
    mean = np.mean(np.asarray([item["vector"] for item in items], dtype=np.float32), axis=0)
    norm = float(np.linalg.norm(mean))
    return mean / norm if norm > 0 else None
