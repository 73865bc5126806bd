"""Stage ``ranking``: the feature ranker on Triton over every candidate, then optionally the
BERT cross-encoder over the top few as a precision vote.

The feature ranker (a DCN-v2 over :data:`core.ranking_features.FEATURES`: each source's rank,
content similarity to the history, popularity, item age, category affinity, co-occurrence)
scores all candidates in one batched request and its click probability becomes the order.
The cross-encoder costs a BERT pass per candidate, so it only re-scores the top
``cross_encoder_top`` (0 = off, the CPU default) and votes there. A ranker that is deployed
but not ready, or that fails or would miss the deadline, leaves the order it found and says
so; a release without a feature ranker keeps retrieval order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from core import fusion
from core.config import Settings
from core.ranking_features import (
    CatalogueClock,
    UserSide,
    co_occurrence_scores,
    feature_matrix,
)
from core.text import item_text, user_text
from services.deadline import Deadline, DeadlineExceeded
from services.inference.triton_client import InferenceUnavailable, TritonClient
from services.recommend.context import RESERVE, Candidate, Context, Stage
from services.recommend.retrieve import PopularItems, Retriever, SequenceSource, query_vector
from services.vectors.store import Row


@dataclass
class RankerStatus:
    """Whether the release has a ranker, and whether Triton can serve it right now."""

    deployed: bool = False
    ready: bool = False


@dataclass
class Rankers:
    """The status of one release's learned models besides the towers: both rankers and the
    sequence model (the gateway's monitor refreshes it, :func:`release_rankers`)."""

    features: RankerStatus = field(default_factory=RankerStatus)
    cross_encoder: RankerStatus = field(default_factory=RankerStatus)
    sequence: RankerStatus = field(default_factory=RankerStatus)

    def statuses(self) -> tuple[RankerStatus, RankerStatus, RankerStatus]:
        return self.features, self.cross_encoder, self.sequence

    def unready(self) -> Rankers:
        """The same release with nothing servable (Triton is unreachable)."""
        return Rankers(*(RankerStatus(s.deployed, False) for s in self.statuses()))


def release_rankers(
    triton: TritonClient,
    index: Mapping[tuple[str, str], str],
    release: str,
    was: Rankers | None = None,
) -> Rankers:
    """What release ``release`` deploys besides the towers, from Triton's repository
    ``index`` (:meth:`TritonClient.repository_index`): a model is part of the release when
    its version of that release is in the index (the cross-encoder: the release's own
    ensemble), and ready when that version is. Triton keeps older releases loaded for
    rollback, so a model a release left out (the catalogue chose not to serve it) still
    answers for "latest": asking by release keeps an older release's ranker or sequence
    model away from this release's candidates. ``was``: this release's status before;
    "deployed" is sticky, so a model of the release that drops out of the index is an
    outage, not a release without it."""
    was = was or Rankers()
    statuses = []
    for model, before in zip(
        (triton.feature_ranker_model, triton.ranker_model, triton.sequence_model),
        was.statuses(),
        strict=True,
    ):
        state = index.get(triton.target(model, release))
        statuses.append(RankerStatus(before.deployed or state is not None, state == "READY"))
    return Rankers(*statuses)


def candidate_features(
    ctx: Context, clock: CatalogueClock, sequence_scores: np.ndarray | None = None
) -> np.ndarray:
    """The feature rows of ``ctx.candidates`` for ``ctx``'s user, built by the same function
    the training job uses (:func:`core.ranking_features.feature_matrix`)."""
    history = ctx.history
    dim = len(history[0]["vector"]) if history else 0
    hist = np.asarray([h["vector"] for h in history], dtype=np.float32).reshape(-1, dim)
    co = ctx.co_scores  # retrieval's, when they are the indexed neighbours' alone
    if co is None:
        co, _ = co_occurrence_scores([h.get("co_items") or [] for h in history])
    profile = ctx.profile or {}
    user = UserSide(hist, dict(profile.get("interests") or {}), len(ctx.history_ids))
    rows = [c.row for c in ctx.candidates]
    vectors = np.asarray(
        [r["vector"] if "vector" in r else np.zeros(dim) for r in rows], dtype=np.float32
    ).reshape(len(rows), dim)
    return feature_matrix(
        user,
        clock,
        vectors,
        [c.ranks for c in ctx.candidates],
        [co.get(c.item_id, 0.0) for c in ctx.candidates],
        [float(r.get("popularity", 0.0)) for r in rows],
        [float(r.get("created_at", 0) or 0) for r in rows],
        [r.get("categories") or [] for r in rows],
        sequence_scores,
    )


def score_ctr(
    triton: TritonClient,
    user_text: str,
    candidates: Sequence[Candidate],
    deadline: Deadline,
    version: str | None = None,
) -> list[float]:
    """The cross-encoder's click probability of each candidate, in one batched request."""
    documents = [
        item_text(c.row["title"], c.row["categories"], c.row.get("text", "")) for c in candidates
    ]
    return [float(p) for p in triton.score(user_text, documents, deadline.left(), version)]


def vote(candidates: Sequence[Candidate], probabilities: Sequence[float], weight: float) -> None:
    """The cross-encoder's order joins the current order as one more list, among
    ``candidates`` (the top of the current order), which stay above the rest:
    ``relevance = floor + rrf(current rank) + weight · rrf(rank by click probability)``.

    A vote rather than a replacement: the cross-encoder sees one (user text, item text) pair
    at a time and none of the collaborative or recency evidence behind the candidates.
    """
    floor = max((c.relevance for c in candidates), default=0.0)
    by_ctr = sorted(range(len(candidates)), key=lambda i: (-probabilities[i], i))
    ctr_rank = {i: r for r, i in enumerate(by_ctr)}
    for i, cand in enumerate(candidates):
        cand.relevance = floor + fusion.rrf(i + 1) + weight * fusion.rrf(ctr_rank[i] + 1)


class Rank(Stage):
    """Sets every candidate's ``relevance`` (the feature ranker's probability when it ran,
    else the fused score; plus the cross-encoder's vote on the top) and ``ranked``; the
    context's release (the variant's, else the served one) picks the release of both."""

    name = "ranking"

    def __init__(
        self,
        settings: Settings,
        triton: TritonClient,
        rankers: Callable[[str], Rankers],
        popular: PopularItems,
    ) -> None:
        self.settings = settings
        self.triton = triton
        self.rankers = rankers
        self.popular = popular

    def run(self, ctx: Context) -> None:
        for cand in ctx.candidates:  # retrieval order until a ranker speaks
            cand.relevance = cand.fused
        if not (ctx.history and ctx.candidates):
            return
        status = self.rankers(ctx.release)
        if status.features.deployed:
            self._features(ctx, status.features)
        top = self.settings.cross_encoder_top
        if top > 0 and self.settings.ranker_weight > 0 and status.cross_encoder.deployed:
            self._cross_encoder(ctx, status.cross_encoder, top)

    def _features(self, ctx: Context, status: RankerStatus) -> None:
        if not status.ready:
            ctx.degraded.append("feature ranker unavailable: triton not ready")
            return
        budget = ctx.answer_by.reserve(RESERVE)  # of what is left now, not at the start
        try:
            scores = self._sequence_scores(ctx, budget)
            features = candidate_features(ctx, self.popular.clock(), scores)
            probabilities = self.triton.rank_features(features, budget.left(), ctx.release or None)
        except (InferenceUnavailable, DeadlineExceeded) as exc:  # a slow sequence model
            ctx.degraded.append(f"feature ranker unavailable: {exc}")
            return
        for cand, p in zip(ctx.candidates, probabilities, strict=True):
            cand.ctr = cand.relevance = float(p)
        ctx.ranked = True

    def _sequence_scores(self, ctx: Context, budget: Deadline) -> np.ndarray | None:
        """The sequence model's score of every candidate (``None``, a feature that says
        nothing, when retrieval could not ask it): retrieval's request scored them all; a
        candidate it did not ask about costs a second request."""
        if ctx.sequence_inputs is None:
            return None
        ids = [c.item_id for c in ctx.candidates]
        scores = ctx.sequence_scores
        missing = [i for i in ids if i not in scores]
        if missing:
            try:
                result = self.triton.sequence(
                    ctx.sequence_inputs, missing, budget.left(), ctx.release or None
                )
            except (InferenceUnavailable, DeadlineExceeded) as exc:
                ctx.degraded.append(f"sequence model unavailable: {exc}")
                return None
            scores = {**scores, **dict(zip(missing, result.candidate_scores.tolist(), strict=True))}
        return np.array([scores[i] for i in ids], dtype=np.float32)

    def _cross_encoder(self, ctx: Context, status: RankerStatus, top: int) -> None:
        if not status.ready:
            ctx.degraded.append("cross-encoder unavailable: triton not ready")
            return
        order = sorted(ctx.candidates, key=lambda c: (-c.relevance, c.item_id))[:top]
        budget = ctx.answer_by.reserve(RESERVE)
        try:
            text = user_text([(h["title"], h["categories"]) for h in ctx.history])
            probabilities = score_ctr(self.triton, text, order, budget, ctx.release or None)
        except (InferenceUnavailable, DeadlineExceeded) as exc:
            ctx.degraded.append(f"cross-encoder unavailable: {exc}")
            return
        vote(order, probabilities, self.settings.ranker_weight)
        ctx.ranked = True


class Supplied(Stage):
    """``RankItems``' retrieval: the client's candidates (already in ``candidates``), each
    with the rank every retrieval source gives it among them (content similarity to the
    history, co-occurrence with it, popularity, the sequence model's top items), fused as
    ``Recommend`` fuses, so the ranker sees the features it was trained on. Every candidate
    also ranks in the ``supplied`` list (the client's order, weight 0)."""

    name = "retrieval"

    def __init__(self, settings: Settings, sequence: SequenceSource | None) -> None:
        self.settings = settings
        self.sequence = sequence
        self.history_query = settings.ann_query == "history"

    def run(self, ctx: Context) -> None:
        rows = [c.row for c in ctx.candidates]
        by_id = {r["item_id"]: r for r in rows}
        lists: dict[str, Sequence[Row | tuple[Row, str]]] = {"supplied": rows}
        history = ctx.history
        if history and rows:
            query = query_vector(ctx.profile, history, ctx.cold or self.history_query)
            sims = np.stack([np.asarray(r["vector"], dtype=np.float32) for r in rows]) @ query
            lists["ann"] = [rows[i] for i in np.argsort(-sims, kind="stable")]
            co, seed = co_occurrence_scores([h.get("co_items") or [] for h in history])
            found = sorted((i for i in by_id if co.get(i)), key=lambda i: -co[i])
            lists["co_occurrence"] = [(by_id[i], history[seed[i]]["title"]) for i in found]
        popular = [r for r in rows if float(r.get("popularity") or 0) > 0]
        popular.sort(key=lambda r: -float(r["popularity"]))
        lists["popular"] = popular
        if self.sequence is not None:
            top = self.sequence(ctx, 3 * self.settings.rank_candidates, (), list(by_id))
            lists["sequence"] = [by_id[i] for i in top if i in by_id]
        weights = {**(ctx.variant.retrieval_mix or self.settings.retrieval_weights), "supplied": 0}
        ctx.candidates = Retriever.fuse(lists, weights, len(rows))
