"""Stage ``ranking``: the feature rows the gateway sends, and the cross-encoder's vote."""

from __future__ import annotations

import time
from typing import NoReturn, cast

import numpy as np
import pytest

from core.config import Settings
from core.ranking_features import FEATURES, CatalogueClock
from services.deadline import Deadline
from services.inference.triton_client import InferenceUnavailable, TritonClient
from services.recommend.context import Candidate, Context, Filters
from services.recommend.rank import (
    Rank,
    Rankers,
    RankerStatus,
    candidate_features,
    release_rankers,
    vote,
)
from services.recommend.retrieve import PopularItems
from tests.services.recommend.fakes import FakeTriton, row


def _col(matrix: np.ndarray, name: str) -> np.ndarray:
    return matrix[:, FEATURES.index(name)]


def test_cross_encoder_votes_among_the_top_which_stay_above_the_rest() -> None:
    top = [Candidate(i, row(i)) for i in "abc"]
    for cand, floor in zip(top, (0.9, 0.8, 0.7), strict=True):
        cand.relevance = floor
    vote(top, [0.1, 0.2, 0.9], weight=1.0)  # the cross-encoder likes c best
    relevance = {c.item_id: c.relevance for c in top}
    # floor + the standard RRF term 1 / (60 + rank), rank 1-based (core.fusion.rrf)
    assert relevance["c"] == pytest.approx(0.9 + 1 / 63 + 1 / 61)
    assert relevance["a"] == pytest.approx(0.9 + 1 / 61 + 1 / 63)
    assert relevance["b"] == pytest.approx(0.9 + 1 / 62 + 1 / 62)
    assert min(relevance.values()) > 0.9  # above every candidate outside the top
    vote(top, [0.1, 0.2, 0.9], weight=0.0)
    assert [c.item_id for c in sorted(top, key=lambda c: -c.relevance)] == ["a", "b", "c"]


def test_candidate_features_are_built_from_the_profile_and_the_rows() -> None:
    ctx = Context.begin("u", 5, Filters(), Deadline.after(5))
    ctx.profile = {"interests": {"A": 0.75, "B": 0.25}}
    ctx.history_ids = ["h0", "h1", "x", "y"]
    ctx.history = [
        {**row("h0"), "vector": [1.0, 0.0], "co_items": ["n", "m"]},
        {**row("h1"), "vector": [0.0, 1.0], "co_items": ["m"]},
    ]
    n = Candidate("n", {**row("n", ("A", "B"), pop=3.0), "vector": [1.0, 0.0], "created_at": 0})
    m = Candidate("m", {**row("m", ("C",), pop=0.0), "vector": [0.6, 0.8], "created_at": 86400})
    n.ranks, m.ranks = {"ann": 0, "popular": 4}, {"co_occurrence": 1}
    ctx.candidates = [n, m]
    f = candidate_features(ctx, CatalogueClock(top_popularity=15.0, now=86400 * 8.0))
    assert f.shape == (2, len(FEATURES)) and f.dtype == np.float32
    assert _col(f, "ann_rr").tolist() == [1.0, 0.0]
    assert _col(f, "popular_rr").tolist() == pytest.approx([0.2, 0.0])
    assert _col(f, "co_occurrence_rr").tolist() == pytest.approx([0.0, 0.5])
    assert _col(f, "sources").tolist() == pytest.approx([2 / 4, 1 / 4])
    # m: 1/2 from h0 (its second neighbour) + 0.9 from h1 (first); n: 1 from h0
    assert _col(f, "co_occurrence_score").tolist() == pytest.approx(np.log1p([1.0, 1.4]))
    assert _col(f, "cos_max").tolist() == pytest.approx([1.0, 0.8])
    assert _col(f, "cos_last").tolist() == pytest.approx([1.0, 0.6])  # h0 is the newest
    assert _col(f, "cos_mean").tolist() == pytest.approx([2**-0.5, 1.4 * 2**-0.5])
    assert _col(f, "popularity").tolist() == pytest.approx([np.log1p(3) / np.log1p(15), 0.0])
    assert _col(f, "age_known").tolist() == [0.0, 1.0]
    assert _col(f, "age").tolist() == pytest.approx([0.0, np.log1p(7) / 10])
    assert _col(f, "category_affinity").tolist() == pytest.approx([1.0, 0.0])
    assert _col(f, "history_len").tolist() == pytest.approx([np.log1p(4) / 10] * 2)
    # no sequence model: rank absent, the uniform log-probability (says nothing)
    assert _col(f, "sequence_rr").tolist() == [0.0, 0.0]
    assert _col(f, "sequence_logp").tolist() == pytest.approx([-np.log(2)] * 2)
    n.ranks["sequence"] = 1
    f = candidate_features(ctx, CatalogueClock(15.0, 86400 * 8.0), np.array([2.0, 0.0]))
    assert _col(f, "sequence_rr").tolist() == [0.5, 0.0]
    p = np.exp(_col(f, "sequence_logp"))
    assert p.sum() == pytest.approx(1.0, abs=1e-6) and p[0] == pytest.approx(1 / (1 + np.e**-2))


class SlowSequence(FakeTriton):
    """A sequence model that runs out its whole timeout, as a Triton timeout does."""

    def sequence(
        self, inputs: object, candidates: object, timeout_s: float, version: object = None
    ) -> NoReturn:
        time.sleep(timeout_s)
        raise InferenceUnavailable("sequence: deadline exceeded")


def test_a_sequence_model_that_uses_the_ranking_budget_leaves_the_retrieval_order() -> None:
    """Its timeout spends the feature ranker's budget too: the ranker is skipped and says
    so, and the stage returns in time instead of raising DeadlineExceeded."""
    ctx = Context.begin("u", 2, Filters(), Deadline.after(0.2))
    ctx.profile = {"interests": {"A": 1.0}}
    ctx.history_ids = ["h0"]
    ctx.history = [{**row("h0"), "vector": [1.0, 0.0], "co_items": []}]
    ctx.sequence_inputs = {"items": np.asarray(["h0"])}
    first = Candidate("a", {**row("a"), "vector": [1.0, 0.0], "created_at": 0})
    second = Candidate("b", {**row("b"), "vector": [0.0, 1.0], "created_at": 0})
    first.fused, second.fused = 0.9, 0.1
    ctx.candidates = [first, second]
    up = Rankers(features=RankerStatus(deployed=True, ready=True))
    stage = Rank(Settings(), cast(TritonClient, SlowSequence()), lambda _: up, PopularItems(10))
    stage(ctx)
    assert not ctx.answer_by.expired()
    assert ctx.degraded == [
        "sequence model unavailable: sequence: deadline exceeded",
        "feature ranker unavailable: deadline exceeded",
    ]
    assert not ctx.ranked and [c.relevance for c in ctx.candidates] == [0.9, 0.1]


def _sequence_ctx(scores: dict[str, float]) -> Context:
    ctx = Context.begin("u", 2, Filters(), Deadline.after(5))
    ctx.profile = {"interests": {"A": 1.0}}
    ctx.history_ids = ["h0"]
    ctx.history = [{**row("h0"), "vector": [1.0, 0.0], "co_items": []}]
    ctx.sequence_inputs = {"items": np.asarray(["h0"])}
    ctx.sequence_scores = scores
    ctx.candidates = [
        Candidate(i, {**row(i), "vector": [1.0, 0.0], "created_at": 0}) for i in ("a", "b")
    ]
    return ctx


def test_the_ranker_reads_the_sequence_scores_retrieval_asked_for() -> None:
    """Every candidate scored by retrieval's request: no second request, and those scores
    are the sequence features; a candidate it did not ask about is asked for alone."""
    triton = FakeTriton()
    up = Rankers(features=RankerStatus(deployed=True, ready=True))
    stage = Rank(Settings(), cast(TritonClient, triton), lambda _: up, PopularItems(10))
    ctx = _sequence_ctx({"a": 2.0, "b": 0.0, "z": 5.0})
    stage(ctx)
    assert ctx.ranked and triton.asked == []
    expected = candidate_features(ctx, stage.popular.clock(), np.array([2.0, 0.0]))
    np.testing.assert_allclose(triton.rows[0], expected)
    ctx = _sequence_ctx({"a": 2.0})
    stage(ctx)
    assert ctx.ranked and triton.asked == [["b"]]
    b = triton.sequence({"items": np.asarray([])}, ["b"], 1.0).candidate_scores[0]
    expected = candidate_features(ctx, stage.popular.clock(), np.array([2.0, b]))
    np.testing.assert_allclose(triton.rows[1], expected)


def test_a_release_deploys_the_models_of_its_own_version_only() -> None:
    """Release 2 left the feature ranker and the cross-encoder out while Triton still serves
    release 1's for rollback: those answer for "latest", not for release 2."""
    triton = TritonClient(Settings())  # no call: the repository index is given
    index = {  # the towers left out: what a release deploys besides them is read alone
        ("feature_ranker", "1"): "READY",
        ("ranker", "1"): "READY",
        ("ranker_scorer", "1"): "READY",  # the shared ensemble: its steps' newest
        ("ranker_scorer_r1", "1"): "READY",
        ("sequence_recommender", "1"): "READY",
        ("sequence_recommender", "2"): "UNAVAILABLE",  # failed to load: an outage
    }
    try:
        first, second = (release_rankers(triton, index, v) for v in ("1", "2"))
        up, down, absent = RankerStatus(True, True), RankerStatus(True, False), RankerStatus()
        assert first == Rankers(features=up, cross_encoder=up, sequence=up)
        assert second == Rankers(features=absent, cross_encoder=absent, sequence=down)
        # "deployed" sticks to the release: its ranker dropping out of the index is an outage
        gone = {k: v for k, v in index.items() if k != ("feature_ranker", "1")}
        assert release_rankers(triton, gone, "1", first).features == down
        assert release_rankers(triton, gone, "1").features == absent
        assert first.unready() == Rankers(features=down, cross_encoder=down, sequence=down)
    finally:
        triton.close()
