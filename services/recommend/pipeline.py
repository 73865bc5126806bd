"""The recommendation pipeline the gateway runs for ``Recommend``, as its list of stages.

profile (Milvus user row and history) -> retrieval (ANN, co-occurrence, segment, global
popularity and the sequence model's best items on Triton, fused; a hundred candidates) ->
ranking (the feature ranker on Triton, one batched request, with the sequence model's scores
among its features; optionally the BERT cross-encoder's vote on the top few) -> diversify
(MMR) -> explain. It degrades instead of failing: without Milvus it answers
from the cached popularity, without Triton (or when Triton would miss the deadline) in
retrieval order; either way the answer says so.
"""

from __future__ import annotations

from collections.abc import Callable

from core.config import Settings
from services.deadline import Deadline
from services.experiments.assignment import Variant
from services.inference.triton_client import TritonClient
from services.recommend.context import Context, Filters, Recommendation, StageObserver, no_metrics
from services.recommend.diversify import Diversify
from services.recommend.explain import Explain
from services.recommend.profile import LoadProfile
from services.recommend.rank import Rank, Rankers
from services.recommend.retrieve import (
    PopularItems,
    PopularOnly,
    Retrieve,
    Retriever,
    SequenceSource,
)
from services.vectors.store import StoreUnavailable, VectorStore


class Pipeline:
    """Composes the stages under one deadline; ``on_stage`` observes each stage's latency."""

    def __init__(
        self,
        settings: Settings,
        store: VectorStore,
        triton: TritonClient,
        popular: PopularItems,
        rankers: Callable[[], Rankers],
        on_stage: StageObserver = no_metrics,
    ) -> None:
        retriever = Retriever(store, popular, settings.popular_refresh_s)
        self.profile = LoadProfile(settings, store)
        self.popular_only = PopularOnly(retriever)
        sequence = SequenceSource(triton, lambda: rankers().sequence.ready)
        self.retrieve = Retrieve(settings, store, retriever, sequence)
        self.rank = Rank(settings, triton, rankers, popular)
        self.diversify = Diversify(settings, popular)
        self.explain = Explain()
        self.on_stage = on_stage

    def recommend(
        self,
        user_id: str,
        k: int,
        filters: Filters,
        deadline: Deadline,
        diversity: float | None = None,
        variant: Variant | None = None,
    ) -> Recommendation:
        """The answer within ``deadline``; the request's ``diversity`` beats the variant's λ."""
        ctx = Context.begin(user_id, k, filters, deadline, diversity, variant, self.on_stage)
        try:
            self.profile(ctx)
        except StoreUnavailable as exc:  # no profile, no personal source: cached popularity
            ctx.degraded.append(f"milvus unavailable: {exc}")
            self.popular_only(ctx)
            return ctx.answer()
        self.retrieve(ctx)
        self.rank(ctx)
        self.diversify(ctx)
        self.explain(ctx)
        return ctx.answer()
