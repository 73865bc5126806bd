"""Pure parts of the pipeline: fusion, MMR, popularity cache, deadlines, behaviour signals."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from core.behaviour import co_occurrence, interests, item_popularity
from ops.segments import spherical_kmeans
from services.deadline import Deadline, DeadlineExceeded
from services.ranking.rerank import fuse_ranker, mmr
from services.retrieval.candidates import Candidate, Filters, Retriever
from services.retrieval.popularity import PopularItems
from services.vectors.store import literal


def row(item_id: str, cats: tuple[str, ...] = ("A",), pop: float = 0.0) -> dict[str, object]:
    return {"item_id": item_id, "title": item_id, "categories": list(cats), "popularity": pop}


def test_fusion_rewards_agreement_between_sources() -> None:
    lists = {"ann": [row("a"), row("b"), row("c")], "popular": [row("c"), row("d")]}
    fused = Retriever.fuse(lists, {"ann": 1.0, "popular": 1.0}, n=10)
    assert fused[0].item_id == "c"  # in both lists
    assert fused[0].ranks == {"ann": 2, "popular": 0}
    assert Retriever.fuse(lists, {"ann": 1.0, "popular": 0.0}, n=2)[0].item_id == "a"


def test_fusion_keeps_each_sources_best_items_among_the_candidates() -> None:
    popular = [row(f"p{i}") for i in range(20)]
    lists = {"popular": popular, "ann": [row("new"), row("p3")], "segment": [row("s")]}
    weights = {"popular": 4.0, "ann": 2.0, "segment": 0.0}
    fused = Retriever.fuse(lists, weights, n=10)  # quota: the first 1 of each weighted source
    ids = [c.item_id for c in fused]
    assert len(ids) == 10 and "new" in ids  # outscored by every popular item, kept anyway
    assert ids[0] == "p3"  # in two lists; the order is still the fused score
    assert ids[-1] == "new"
    assert "s" not in ids  # a source with weight 0 reserves nothing


def test_ranker_votes_in_the_fusion_instead_of_replacing_it() -> None:
    lists = {"ann": [row("a"), row("b"), row("c")], "popular": [row("a"), row("c")]}
    cands = Retriever.fuse(lists, {"ann": 1.0, "popular": 1.0}, n=10)  # a, c, b
    for cand, ctr in zip(cands, (0.1, 0.2, 0.9), strict=True):  # the ranker likes b best
        cand.ctr = ctr
    fused = {c.item_id: c.fused for c in cands}
    fuse_ranker(cands, weight=1.0)
    relevance = {c.item_id: c.relevance for c in cands}
    # the standard RRF term 1 / (60 + rank), rank 1-based (core.fusion.rrf, also offline)
    assert relevance["b"] == pytest.approx(fused["b"] + 1 / 61)  # first by probability
    assert relevance["a"] == pytest.approx(fused["a"] + 1 / 63)
    assert relevance["a"] > relevance["b"]  # two sources' agreement outweighs one vote
    fuse_ranker(cands, weight=0.0)
    assert {c.item_id: c.relevance for c in cands} == fused


def test_popularity_decays_with_age_and_counts_users_once() -> None:
    day = pd.Timedelta(days=1)
    t0 = pd.Timestamp("2020-01-01", tz="UTC")
    events = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u2", "u3", "u4"],
            "item_id": ["old", "old", "old", "new", "neg"],
            "timestamp": [t0, t0 + day, t0, t0 + 365 * day, t0 + 365 * day],
            "weight": [1.0, 1.0, 1.0, 1.0, 0.0],
        }
    )
    decayed = item_popularity(events, half_life_days=365.0)
    assert decayed["new"] == pytest.approx(1.0)  # one user, at the newest time
    # two users a year (u2) and 364 days (u1's latest) before the newest event
    assert decayed["old"] == pytest.approx(0.5 + 0.5 ** (364 / 365))
    assert "neg" not in decayed
    assert item_popularity(events, half_life_days=None) == {"old": 2.0, "new": 1.0}


def test_mmr_zero_is_relevance_order_and_diversity_spreads() -> None:
    vecs = {"a": [1, 0], "a2": [0.99, 0.14], "b": [0, 1]}
    cands = []
    for item_id, rel in (("a", 1.0), ("a2", 0.9), ("b", 0.5)):
        c = Candidate(item_id, {"vector": np.array(vecs[item_id], dtype=np.float32)})
        c.relevance = rel
        cands.append(c)
    assert [c.item_id for c in mmr(cands, 3, 0.0)] == ["a", "a2", "b"]
    assert [c.item_id for c in mmr(cands, 2, 0.7)] == ["a", "b"]
    assert mmr([], 3, 0.5) == []


def test_filters_and_popularity_cache() -> None:
    f = Filters(("Drama",), frozenset({"x"}))
    assert f.admits(row("y", ("Drama", "War")))
    assert not f.admits(row("x", ("Drama",)))
    assert not f.admits(row("z", ("Comedy",)))
    cache = PopularItems(size=3)
    cache._items = [row("a", ("A",), 9), row("b", ("B",), 5), row("c", ("A",), 1)]
    assert [r["item_id"] for r in cache.top(2, ("A",))] == ["a", "c"]
    assert [r["item_id"] for r in cache.top(5, (), {"a"})] == ["b", "c"]


def test_deadline() -> None:
    d = Deadline.from_remaining(None, 0.5)
    assert 0.4 < d.left() <= 0.5
    assert d.reserve(0.5).at < d.at
    gone = Deadline(time.monotonic() - 1)
    assert gone.expired()
    with pytest.raises(DeadlineExceeded):
        gone.left()


def test_milvus_literals_escape_client_strings() -> None:
    assert literal('Sci "Fi') == '"Sci \\"Fi"'
    assert literal(["a\\b", "c"]) == '["a\\\\b", "c"]'


def test_interests_decay_with_recency() -> None:
    got = interests([("new", ["Drama"]), ("old", ["Comedy"])])
    assert got["Drama"] > got["Comedy"]
    assert abs(sum(got.values()) - 1) < 1e-3
    assert interests([]) == {}


def test_co_occurrence_is_cosine_over_users() -> None:
    events = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u2", "u2", "u3", "u3", "u3"],
            "item_id": ["a", "b", "a", "b", "a", "c", "b"],
            "weight": [1.0] * 7,
        }
    )
    co = co_occurrence(events, top=5, min_support=2)
    assert co["a"] == ["b"]  # a-c seen together once: below support
    assert co["b"] == ["a"]
    assert "c" not in co


def test_spherical_kmeans_separates_clusters() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal([5, 0, 0], 0.1, (20, 3))
    b = rng.normal([0, 5, 0], 0.1, (20, 3))
    x = np.vstack([a, b]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    centroids, labels = spherical_kmeans(x, 2, seed=1)
    assert len(set(labels[:20])) == 1 and len(set(labels[20:])) == 1
    assert labels[0] != labels[-1]
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-5)
