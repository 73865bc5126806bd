"""The recommendation pipeline the gateway runs for ``Recommend``.

profile (Milvus user row and history) -> retrieval (ANN, co-occurrence, segment and global
popularity, fused) -> ranking (CTR cross-encoder on Triton, one batched request) -> MMR
diversity re-rank -> explanations. It degrades instead of failing: without Milvus it answers
from the cached popularity, without Triton (or when Triton would miss the deadline) in
retrieval order; either way the answer says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from core.config import Settings
from core.text import user_text
from services.deadline import Deadline
from services.inference.triton_client import InferenceUnavailable, TritonClient
from services.ranking.rerank import fuse_ranker, mmr, score_ctr
from services.retrieval.candidates import Candidate, Filters, Retriever
from services.retrieval.popularity import PopularItems
from services.vectors.store import Row, StoreUnavailable, VectorStore

NEW_ITEM_AGE_S = 90 * 24 * 3600
# Share of the time left kept back at each dependency call, so a dependency that is down or
# slow still leaves time to answer from what the gateway has (popularity, retrieval order).
RESERVE = 0.25


@dataclass(frozen=True)
class Variant:
    """What an experiment arm may change in the pipeline."""

    mmr_lambda: float | None = None
    retrieval_weights: Mapping[str, float] | None = None
    model_version: str | None = None  # ranker release on Triton


@dataclass
class Recommendation:
    """The pipeline's answer with what a client and the metrics need to know about it."""

    items: list[Candidate]
    reasons: list[str]
    cold_start: bool = False
    degraded: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    candidates: int = 0
    ranked: bool = False


@dataclass
class RankerStatus:
    """Whether the release has a ranker, and whether Triton can serve it right now."""

    deployed: bool = False
    ready: bool = False


class Pipeline:
    """Composes profiling, retrieval and ranking under one deadline."""

    def __init__(
        self,
        settings: Settings,
        store: VectorStore,
        triton: TritonClient,
        popular: PopularItems,
        ranker: Callable[[], RankerStatus],
    ) -> None:
        self.settings = settings
        self.store = store
        self.triton = triton
        self.retriever = Retriever(store, popular)
        self.ranker = ranker
        self.history_query = settings.ann_query == "history"

    def recommend(
        self,
        user_id: str,
        k: int,
        filters: Filters,
        deadline: Deadline,
        diversity: float | None = None,
        variant: Variant | None = None,
    ) -> Recommendation:
        variant = variant or Variant()
        clock = _Clock()
        answer_by = deadline
        deadline = answer_by.reserve(RESERVE)  # what dependency calls may use
        try:
            profile = self.store.get_user(user_id, deadline.left())
            history_ids = list(profile["recent_items"]) if profile else []
            window = history_ids[: self.settings.history_window]
            found = self.store.get_items(
                window, deadline.left(), with_vectors=True, with_neighbours=True
            )
        except StoreUnavailable as exc:
            return self._popular_only(k, filters, f"milvus unavailable: {exc}", clock)
        history = [found[i] for i in window if i in found]
        cold = len(history_ids) <= self.settings.cold_start_events
        clock.lap("profile")

        n = self.settings.rank_candidates
        # Milvus filters the ANN search by the recent history (a short expression); every
        # source is then filtered in memory by everything the user has interacted with.
        seen = Filters(filters.categories, filters.exclude | set(history_ids))
        seen_all = Filters(
            filters.categories, seen.exclude | set(profile["seen_items"] if profile else ())
        )
        lists: dict[str, Sequence[Row | tuple[Row, str]]] = {}
        degraded: list[str] = []
        try:
            if history:
                query = self._query_vector(profile, history, cold or self.history_query)
                hits = self.retriever.ann(query, 2 * n, seen, deadline)
                lists["ann"] = [h for h in hits if seen_all.admits(h)][:n]
                lists["co_occurrence"] = self.retriever.co_occurrence(
                    history, n, seen_all, deadline
                )
            if profile and profile["segment"]:
                segment = self.store.get_segment(profile["segment"], deadline.left())
                if segment:
                    lists["segment"] = self.retriever.segment(
                        segment["popular_items"], n, seen_all, deadline
                    )
        except StoreUnavailable as exc:
            degraded.append(f"milvus unavailable: {exc}")
        lists["popular"] = self.retriever.global_popular(n, seen_all)
        weights = variant.retrieval_weights or self.settings.retrieval_weights
        candidates = Retriever.fuse(lists, weights, n)
        self._attach_vectors(candidates, deadline, degraded)
        clock.lap("retrieval")

        for cand in candidates:  # retrieval order until the ranker votes
            cand.relevance = cand.fused
        ranked = False
        status = self.ranker()
        ranker_weight = self.settings.ranker_weight
        if history and candidates and status.deployed and ranker_weight > 0:
            if not status.ready:
                degraded.append("ranker unavailable: triton not ready")
            else:
                budget = answer_by.reserve(RESERVE)
                try:
                    text = user_text([(h["title"], h["categories"]) for h in history])
                    score_ctr(self.triton, text, candidates, budget, variant.model_version)
                    fuse_ranker(candidates, ranker_weight)
                    ranked = True
                except InferenceUnavailable as exc:
                    degraded.append(f"ranker unavailable: {exc}")
        lam = diversity if diversity is not None else variant.mmr_lambda
        lam = self.settings.mmr_lambda if lam is None else lam
        with_vectors = all("vector" in c.row for c in candidates)
        final = mmr(candidates, k, lam if with_vectors else 0.0)
        clock.lap("ranking")
        return Recommendation(
            items=final,
            reasons=[self._reason(c, history) for c in final],
            cold_start=cold,
            degraded=degraded,
            timings=clock.laps,
            candidates=len(candidates),
            ranked=ranked,
        )

    # --- helpers -------------------------------------------------------------------------
    @staticmethod
    def _query_vector(
        profile: Row | None, history: Sequence[Row], from_history: bool
    ) -> np.ndarray:
        """The mean item vector of the recent history (cold-start users, and everyone with
        ``ann_query=history``), else the user-tower vector."""
        if profile is not None and not from_history and "vector" in profile:
            return np.asarray(profile["vector"], dtype=np.float32)
        mean = np.mean([h["vector"] for h in history], axis=0)
        return (mean / (np.linalg.norm(mean) or 1.0)).astype(np.float32)

    def _attach_vectors(
        self, candidates: list[Candidate], deadline: Deadline, degraded: list[str]
    ) -> None:
        missing = [c.item_id for c in candidates if "vector" not in c.row]
        if not missing:
            return
        try:
            rows = self.store.get_items(missing, deadline.left(), with_vectors=True)
        except StoreUnavailable as exc:
            if not degraded:
                degraded.append(f"milvus unavailable: {exc}")
            return
        for cand in candidates:
            if cand.item_id in rows:
                cand.row = {**cand.row, **rows[cand.item_id]}

    def _popular_only(self, k: int, filters: Filters, reason: str, clock: _Clock) -> Recommendation:
        rows = self.retriever.global_popular(k, filters)
        top = max((float(r["popularity"]) for r in rows), default=1.0) or 1.0
        items = [Candidate(r["item_id"], r, {"popular": i}) for i, r in enumerate(rows)]
        for cand in items:
            cand.relevance = float(cand.row["popularity"]) / top
        clock.lap("retrieval")
        return Recommendation(
            items=items,
            reasons=["popular overall"] * len(items),
            degraded=[reason],
            timings=clock.laps,
            candidates=len(items),
        )

    @staticmethod
    def _reason(cand: Candidate, history: Sequence[Row]) -> str:
        row = cand.row
        created = int(row.get("created_at") or 0)
        if not row.get("popularity") and created and time.time() - created < NEW_ITEM_AGE_S:
            category = row["categories"][0] if row["categories"] else "the catalogue"
            return f"new in {category}"
        source = cand.best_source
        if source == "ann" and history and "vector" in row:
            sims = np.stack([h["vector"] for h in history]) @ np.asarray(row["vector"])
            return f"similar to {history[int(np.argmax(sims))]['title']} you liked"
        if source == "co_occurrence" and cand.because_of.get(source):
            return f"people who liked {cand.because_of[source]} also liked this"
        if source == "segment":
            return "popular in your segment"
        return "popular overall"


class _Clock:
    """Per-stage wall time, for the latency histograms."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = now - self.last
        self.last = now
