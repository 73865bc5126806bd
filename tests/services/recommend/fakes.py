"""In-memory stand-ins for Milvus and Triton, enough to run the stages without either."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from core.ranking_features import FEATURES
from services.inference.triton_client import InferenceUnavailable, SequenceResult
from services.vectors.store import Row, StoreUnavailable


def row(item_id: str, cats: tuple[str, ...] = ("A",), pop: float = 0.0) -> dict[str, Any]:
    return {"item_id": item_id, "title": item_id, "categories": list(cats), "popularity": pop}


class FakeStore:
    """Items, users and segments in dicts; ``down`` names the calls that fail."""

    def __init__(
        self, items: Iterable[Row], users: Iterable[Row] = (), segments: Iterable[Row] = ()
    ) -> None:
        self.items = {r["item_id"]: r for r in items}
        self.users = {r["user_id"]: r for r in users}
        self.segments = {r["segment_id"]: r for r in segments}
        self.down: set[str] = set()
        self.slow: dict[str, float] = {}  # call -> seconds it takes before it succeeds
        self.calls: list[str] = []  # every call, in order
        self.scanned: list[Sequence[str] | None] = []  # the fields of each all_items scan
        self.read: list[list[str]] = []  # the ids of each get_items read
        self.item_cache_size = 10_000
        #: (min_popularity, min_created_at, ids) of each items_where read
        self.filtered: list[tuple[float | None, int | None, list[str] | None]] = []
        self.counted: list[tuple[float | None, int | None]] = []  # each count_items' conditions

    def _check(self, call: str) -> None:
        self.calls.append(call)
        if call in self.down or "all" in self.down:
            raise StoreUnavailable(f"{call}: connection refused")
        time.sleep(self.slow.get(call, 0.0))

    def _out(self, r: Row, with_vectors: bool, with_neighbours: bool = False) -> Row:
        drop = {"vector"} if not with_vectors else set()
        drop |= {"co_items"} if not with_neighbours else set()
        return {k: v for k, v in r.items() if k not in drop}

    def get_user(
        self, user_id: str, timeout: float, with_vector: bool = True, cached: bool = False
    ) -> Row | None:
        self._check("get_user")
        user = self.users.get(user_id)
        return None if user is None else self._out(user, with_vector)

    def get_items(
        self,
        item_ids: Iterable[str],
        timeout: float,
        with_vectors: bool = False,
        with_neighbours: bool = False,
    ) -> dict[str, Row]:
        self._check("get_items")
        self.read.append(list(dict.fromkeys(item_ids)))
        return {
            i: self._out(self.items[i], with_vectors, with_neighbours)
            for i in self.read[-1]
            if i in self.items
        }

    def search_items(
        self,
        vector: np.ndarray,
        limit: int,
        timeout: float,
        categories: Sequence[str] = (),
        exclude_ids: Sequence[str] = (),
        with_vectors: bool = False,
    ) -> list[Row]:
        self._check("search_items")
        hits = [
            {**self._out(r, with_vectors), "score": float(np.dot(r["vector"], vector))}
            for r in self.items.values()
            if r["item_id"] not in exclude_ids
            and (not categories or set(categories) & set(r["categories"]))
        ]
        return sorted(hits, key=lambda h: (-h["score"], h["item_id"]))[:limit]

    def get_segment(self, segment_id: str, timeout: float) -> Row | None:
        self._check("get_segment")
        return self.segments.get(segment_id)

    def all_items(
        self,
        fields: Sequence[str] | None = None,
        fill_cache: bool = False,
        fits: bool | None = None,
    ) -> list[Row]:
        self._check("all_items")
        self.scanned.append(fields)
        rows = [self._out(r, False) for r in self.items.values()]
        return rows if fields is None else [{k: r[k] for k in fields if k in r} for r in rows]

    def item_cache_holds_catalogue(self) -> bool:
        return len(self.items) <= self.item_cache_size

    def items_where(
        self,
        fields: Sequence[str],
        *,
        min_popularity: float | None = None,
        min_created_at: int | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[Row]:
        self._check("items_where")
        self.filtered.append((min_popularity, min_created_at, None if ids is None else list(ids)))
        where = self._where(min_popularity, min_created_at, ids)
        return [{k: r[k] for k in fields if k in r} for r in where]

    def count_items(
        self, *, min_popularity: float | None = None, min_created_at: int | None = None
    ) -> int:
        self._check("count_items")
        self.counted.append((min_popularity, min_created_at))
        return len(self._where(min_popularity, min_created_at, None))

    def least_popular_items(
        self, fields: Sequence[str], limit: int, below: float, timeout: float
    ) -> list[Row]:
        self._check("least_popular_items")
        rows = sorted(
            (r for r in self.items.values() if r["popularity"] < below), key=lambda r: r["item_id"]
        )
        return [{k: r[k] for k in fields if k in r} for r in rows[: max(limit, 0)]]

    def _where(
        self, min_popularity: float | None, min_created_at: int | None, ids: Sequence[str] | None
    ) -> list[Row]:
        return [
            r
            for r in self.items.values()
            if (min_popularity is None or r["popularity"] >= min_popularity)
            and (min_created_at is None or int(r.get("created_at") or 0) >= min_created_at)
            and (ids is None or r["item_id"] in ids)
        ]


class FakeTriton:
    """Click probabilities from a hash of the document; ``down`` makes every call fail."""

    def __init__(self) -> None:
        self.down = False
        self.versions: list[str | None] = []
        self.scored: list[int] = []  # documents per cross-encoder call
        self.rows: list[np.ndarray] = []  # feature rows per feature-ranker call
        self.sequence_top: list[str] = []  # the sequence model's best items, best first
        self.asked: list[list[str]] = []  # the candidates of each sequence-model call

    def score(
        self, query: str, documents: Sequence[str], timeout_s: float, version: str | None = None
    ) -> np.ndarray:
        if self.down:
            raise InferenceUnavailable("ranker_scorer: connection refused")
        self.versions.append(version)
        digest = [hashlib.sha256(f"{query}|{d}".encode()).digest()[0] for d in documents]
        self.scored.append(len(documents))
        return np.asarray(digest, dtype=np.float32) / 255.0

    def rank_features(
        self, features: np.ndarray, timeout_s: float, version: str | None = None
    ) -> np.ndarray:
        """A fixed function of the rows: the mean of content similarity and popularity."""
        if self.down:
            raise InferenceUnavailable("feature_ranker: connection refused")
        self.versions.append(version)
        self.rows.append(np.array(features))
        cos = features[:, FEATURES.index("cos_mean")]
        return ((cos + features[:, FEATURES.index("popularity")]) / 2).astype(np.float32)

    def sequence(
        self,
        inputs: Mapping[str, np.ndarray],
        candidates: Sequence[str],
        timeout_s: float,
        version: str | None = None,
    ) -> SequenceResult:
        """``sequence_top`` less the inputs; every item's score a hash of its id, the same
        in both outputs, as one model's are."""
        if self.down:
            raise InferenceUnavailable("sequence_recommender: connection refused")
        self.asked.append(list(candidates))
        history = {str(i) for i in inputs["items"]}
        top = [i for i in self.sequence_top if i not in history]
        return SequenceResult(top, _hash_scores(top), _hash_scores(candidates))


def _hash_scores(ids: Sequence[str]) -> np.ndarray:
    return np.asarray([hashlib.sha256(i.encode()).digest()[0] for i in ids], np.float32) / 25.5
