"""Candidate retrieval: ANN on the user vector, co-occurrence, segment and global popularity.

Each source returns its own ranked list; lists are merged by weighted reciprocal-rank fusion
(:func:`core.fusion.rrf`), which needs no score calibration between sources. Items
the user has seen, excluded ids and items outside the category filter never survive.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from core.fusion import rrf
from services.deadline import Deadline
from services.retrieval.popularity import PopularItems
from services.vectors.store import Row, VectorStore

CO_SEEDS = 10  # most recent history items whose neighbours are expanded
# Each weighted source's best items keep this share of the candidate slots whatever their
# fused score: with popularity weighted 4, a personal source's first item (2 / 61) would
# otherwise never outscore the 30th popular one (4 / 90), and new items, which only the ANN
# finds, could never be ranked at all.
SOURCE_QUOTA = 0.1


@dataclass
class Candidate:
    """An item with the evidence for it from each source."""

    item_id: str
    row: Row
    ranks: dict[str, int] = field(default_factory=dict)  # source -> 0-based rank there
    because_of: dict[str, str] = field(default_factory=dict)  # source -> history title
    fused: float = 0.0
    relevance: float = 0.0  # what the final order uses: fused score (+ the ranker's vote)
    ctr: float | None = None  # the CTR ranker's click probability, when it scored the item

    @property
    def best_source(self) -> str:
        return min(self.ranks, key=lambda s: self.ranks[s])


@dataclass(frozen=True)
class Filters:
    categories: tuple[str, ...] = ()
    exclude: frozenset[str] = frozenset()

    def admits(self, row: Row) -> bool:
        if row["item_id"] in self.exclude:
            return False
        return not self.categories or bool(set(self.categories) & set(row["categories"]))


class Retriever:
    """Collects and fuses candidates from every source."""

    def __init__(self, store: VectorStore, popular: PopularItems) -> None:
        self.store = store
        self.popular = popular

    def ann(self, vector: np.ndarray, n: int, filters: Filters, deadline: Deadline) -> list[Row]:
        return self.store.search_items(
            vector,
            n,
            deadline.left(),
            filters.categories,
            sorted(filters.exclude),
            with_vectors=True,
        )

    def co_occurrence(
        self, history: Sequence[Row], n: int, filters: Filters, deadline: Deadline
    ) -> list[tuple[Row, str]]:
        """Neighbours of recent history items, scored by recency of the seed and their rank."""
        scores: dict[str, float] = defaultdict(float)
        seed_of: dict[str, str] = {}
        for h_rank, seed in enumerate(history[:CO_SEEDS]):
            for n_rank, neighbour in enumerate(seed.get("co_items") or []):
                gain = 0.9**h_rank / (1 + n_rank)
                if gain > scores.get(neighbour, 0.0):
                    seed_of[neighbour] = seed["title"]
                scores[neighbour] += gain
        ranked = sorted((i for i in scores if i not in filters.exclude), key=lambda i: -scores[i])[
            : 3 * n
        ]
        rows = self.store.get_items(ranked, deadline.left(), with_vectors=True)
        admitted = [rows[i] for i in ranked if i in rows and filters.admits(rows[i])]
        return [(row, seed_of[row["item_id"]]) for row in admitted[:n]]

    def segment(
        self, popular_ids: Sequence[str], n: int, filters: Filters, deadline: Deadline
    ) -> list[Row]:
        wanted = [i for i in popular_ids if i not in filters.exclude][: 3 * n]
        rows = self.store.get_items(wanted, deadline.left(), with_vectors=True)
        return [rows[i] for i in wanted if i in rows and filters.admits(rows[i])][:n]

    def global_popular(self, n: int, filters: Filters) -> list[Row]:
        return self.popular.top(n, filters.categories, filters.exclude)

    @staticmethod
    def fuse(
        lists: Mapping[str, Sequence[Row | tuple[Row, str]]],
        weights: Mapping[str, float],
        n: int,
    ) -> list[Candidate]:
        """Weighted reciprocal-rank fusion of per-source lists into the top ``n``, each weighted
        source's first ``SOURCE_QUOTA * n`` items kept (see ``SOURCE_QUOTA``)."""
        merged: dict[str, Candidate] = {}
        for source, entries in lists.items():
            weight = float(weights.get(source, 0.0))
            for rank, entry in enumerate(entries):
                row, because = entry if isinstance(entry, tuple) else (entry, "")
                cand = merged.setdefault(row["item_id"], Candidate(row["item_id"], row))
                if "vector" not in cand.row and "vector" in row:
                    cand.row = row
                cand.ranks[source] = rank
                if because:
                    cand.because_of[source] = because
                cand.fused += weight * rrf(rank + 1)
        ranked = sorted(merged.values(), key=lambda c: (-c.fused, c.item_id))
        quota = int(SOURCE_QUOTA * n)
        kept = {
            cand.item_id
            for cand in ranked
            for source, rank in cand.ranks.items()
            if rank < quota and weights.get(source, 0.0) > 0
        }
        chosen = [c for c in ranked if c.item_id in kept][:n]
        chosen += [c for c in ranked if c.item_id not in kept][: n - len(chosen)]
        return sorted(chosen, key=lambda c: (-c.fused, c.item_id))
