"""The stages composed, on in-memory Milvus and Triton: order, metrics, variant, degrading."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, cast

import numpy as np

from core.config import Settings
from services.deadline import Deadline
from services.experiments.assignment import Variant
from services.inference.triton_client import TritonClient
from services.recommend.context import Filters
from services.recommend.pipeline import Pipeline
from services.recommend.rank import Rankers, RankerStatus
from services.recommend.retrieve import PopularItems
from services.vectors.store import VectorStore
from tests.services.recommend.fakes import FakeStore, FakeTriton, row

STAGES = ["profile", "retrieval", "ranking", "diversify", "explain"]
UP = RankerStatus(deployed=True, ready=True)
FEATURES_UP = Rankers(features=UP)
BOTH_UP = Rankers(features=UP, cross_encoder=UP)


def _vec(*xs: float) -> np.ndarray:
    v = np.asarray(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


def _world() -> tuple[FakeStore, FakeTriton]:
    items = []
    for i in range(12):
        r = row(f"i{i}", ("A",) if i % 2 else ("B",), pop=float(12 - i))
        r |= {"vector": _vec(1.0, i / 4), "co_items": [f"i{(i + 1) % 12}"], "created_at": 0}
        items.append(r)
    user = {
        "user_id": "u1",
        "recent_items": ["i0", "i1", "i2", "i3", "i4"],
        "seen_items": ["i0", "i1", "i2", "i3", "i4"],
        "segment": "s0",
        "vector": _vec(1.0, 1.0),
    }
    segment = {"segment_id": "s0", "popular_items": ["i9", "i10"]}
    return FakeStore(items, [user], [segment]), FakeTriton()


def _pipeline(
    store: FakeStore,
    triton: FakeTriton,
    status: Rankers | Mapping[str, Rankers],
    observed: list[tuple[str, float]] | None = None,
    served: str = "",
    **settings: Any,
) -> Pipeline:
    """``status``: what every release deploys, or each release's (others: nothing)."""
    popular = PopularItems(100)
    milvus = cast(VectorStore, store)
    assert popular.refresh(milvus)
    sink = [] if observed is None else observed

    def rankers(release: str) -> Rankers:
        if isinstance(status, Rankers):
            return status
        return status.get(release, Rankers())

    return Pipeline(
        Settings(**settings),
        milvus,
        cast(TritonClient, triton),
        popular,
        rankers,
        on_stage=lambda stage, seconds: sink.append((stage, seconds)),
        served=lambda: served,
    )


def test_stages_run_in_order_and_each_observes_its_latency() -> None:
    store, triton = _world()
    observed: list[tuple[str, float]] = []
    pipe = _pipeline(store, triton, FEATURES_UP, observed)
    rec = pipe.recommend("u1", 4, Filters(), Deadline.after(5), variant=Variant(model_version="3"))
    assert [s for s, _ in observed] == [*STAGES, "milvus"]  # its Milvus time last
    assert rec.timings == dict(observed)
    assert rec.ranked and not rec.degraded and not rec.cold_start
    assert len(rec.items) == 4 == len(rec.reasons)
    assert not {c.item_id for c in rec.items} & {"i0", "i1", "i2", "i3", "i4"}  # seen
    assert triton.versions == ["3"]  # the variant's ranker release
    assert triton.scored == []  # the cross-encoder is off by default
    # one request for every candidate, and its probability is the order (MMR off)
    assert [len(r) for r in triton.rows] == [rec.candidates]
    rec = pipe.recommend("u1", 7, Filters(), Deadline.after(5), diversity=0.0)
    assert [c.relevance for c in rec.items] == sorted((c.ctr or 0 for c in rec.items), reverse=True)
    assert all(c.ctr is not None for c in rec.items)


def test_each_request_asks_the_models_of_its_own_release() -> None:
    """The served release's ranker by default, a variant's pinned one instead; a release
    that deploys no feature ranker keeps retrieval order, which is no outage."""
    store, triton = _world()
    pipe = _pipeline(store, triton, {"5": FEATURES_UP, "4": Rankers()}, served="5")
    rec = pipe.recommend("u1", 4, Filters(), Deadline.after(5))
    assert rec.ranked and not rec.degraded and triton.versions == ["5"] and rec.release == "5"
    rec = pipe.recommend("u1", 4, Filters(), Deadline.after(5), variant=Variant(model_version="4"))
    assert not rec.ranked and not rec.degraded and triton.versions == ["5"]  # not asked
    assert rec.release == "4"  # what the response reports as its model_version
    assert all(c.ctr is None for c in rec.items)  # no ranker's probability: fused order


def test_a_request_reads_milvus_four_times_and_segments_are_cached() -> None:
    store, triton = _world()
    pipe = _pipeline(store, triton, FEATURES_UP)
    store.calls.clear()  # the popularity cache's scan at start
    rec = pipe.recommend("u1", 12, Filters(), Deadline.after(5), diversity=0.0)
    # profile: user + history rows; retrieval: the segment's first read (then cached), one
    # read for the co-occurrence, segment and popular rows, the ANN search
    assert store.calls == ["get_user", "get_items", "get_segment", "search_items", "get_items"]
    assert {"co_occurrence", "segment", "popular", "ann"} <= {s for c in rec.items for s in c.ranks}
    store.calls.clear()
    pipe.recommend("u1", 5, Filters(), Deadline.after(5))
    assert store.calls == ["get_user", "get_items", "search_items", "get_items"]
    assert all("vector" in c.row for c in rec.items)


def test_one_sequence_model_request_scores_every_candidate() -> None:
    """Retrieval asks the sequence model for its best items and for its scores of every
    other source's items in one request; the ranker's sequence features come from it."""
    from core.ranking_features import FEATURES

    store, triton = _world()
    store.users["u1"] |= {
        "events": {"items": ["i0", "i1"], "tokens": [1, 1], "seconds": [10, 20]},
        "history_size": 2,
    }
    triton.sequence_top = ["i1", "i11", "i7"]
    pipe = _pipeline(store, triton, Rankers(features=UP, sequence=UP))
    rec = pipe.recommend("u1", 6, Filters(), Deadline.after(5), diversity=0.0)
    assert rec.ranked and not rec.degraded
    assert len(triton.asked) == 1  # retrieval's request; ranking asked nothing
    assert {c.item_id for c in rec.items if "sequence" in c.ranks} == {"i7", "i11"} & {
        c.item_id for c in rec.items
    }
    (rows,) = triton.rows
    logp = rows[:, FEATURES.index("sequence_logp")]
    assert len(set(logp.round(6))) > 1  # the model's scores, not the "says nothing" default
    # the other sources' items (popularity's here holds the whole unseen catalogue)
    assert set(triton.asked[0]) == {f"i{i}" for i in range(5, 12)}


def test_a_failed_rows_read_after_the_ann_search_leaves_its_hits_out() -> None:
    """The ANN search runs before the sources' rows are read; when that read fails, its
    hits stay out of the answer (exploration included), as when the search itself fails."""
    from services.recommend.context import Context

    store, triton = _world()
    reads = iter([False, True])  # the profile's history rows, then retrieval's
    check = store._check

    def failing_second_read(call: str) -> None:
        if call == "get_items" and next(reads, False):
            store.down.add("get_items")
        check(call)

    pipe = _pipeline(store, triton, FEATURES_UP)  # its popularity refresh reads rows too
    store._check = failing_second_read  # type: ignore[method-assign]
    ctx = Context.begin("u1", 5, Filters(), Deadline.after(5))
    pipe.profile(ctx)
    pipe.retrieve(ctx)
    assert "search_items" in store.calls and ctx.degraded[0].startswith("milvus unavailable")
    assert ctx.ann_rows == [] and all("ann" not in c.ranks for c in ctx.candidates)


def test_cross_encoder_votes_only_on_the_top_when_enabled() -> None:
    store, triton = _world()
    plain = _pipeline(store, triton, BOTH_UP).recommend("u1", 7, Filters(), Deadline.after(5), 0.0)
    pipe = _pipeline(store, triton, BOTH_UP, cross_encoder_top=3)
    rec = pipe.recommend("u1", 7, Filters(), Deadline.after(5), diversity=0.0)
    assert triton.scored == [3]  # a BERT pass for the top three only
    assert {c.item_id for c in rec.items[:3]} == {c.item_id for c in plain.items[:3]}
    assert [c.item_id for c in rec.items[3:]] == [c.item_id for c in plain.items[3:]]
    assert rec.ranked and not rec.degraded


def test_variant_mix_and_lambda_reach_the_stages() -> None:
    store, triton = _world()
    pipe = _pipeline(store, triton, Rankers())
    only_segment = Variant(retrieval_mix={"segment": 1.0}, mmr_lambda=0.0)
    rec = pipe.recommend("u1", 2, Filters(), Deadline.after(5), variant=only_segment)
    assert [c.item_id for c in rec.items] == ["i9", "i10"]  # the only weighted source
    assert rec.reasons == ["popular in your segment"] * 2
    assert not rec.ranked  # no ranker deployed: retrieval order, not degraded
    assert not rec.degraded


def test_milvus_down_answers_from_cached_popularity() -> None:
    store, triton = _world()
    observed: list[tuple[str, float]] = []
    pipe = _pipeline(store, triton, FEATURES_UP, observed)
    store.down.add("get_user")
    rec = pipe.recommend("u1", 3, Filters(("A",)), Deadline.after(5))
    assert [c.item_id for c in rec.items] == ["i1", "i3", "i5"]  # most popular of A
    assert rec.reasons == ["popular overall"] * 3
    assert rec.degraded == ["milvus unavailable: get_user: connection refused"]
    assert [s for s, _ in observed] == ["retrieval", "milvus"]  # timed from the start
    assert rec.items[0].relevance == 1.0 and rec.candidates == 3 and not rec.ranked


def test_reads_that_use_up_the_dependency_budget_answer_popular_in_time() -> None:
    """A read that succeeds slowly (a restarted Milvus loading its collections) leaves the
    next read no time: the answer is the cached popularity within the deadline, degraded,
    never a DeadlineExceeded; in either stage that reads (once the profile is read, without
    what the user has seen)."""
    for slow_call, popular in [
        ("get_user", ["i1", "i3", "i5"]),
        ("get_segment", ["i5", "i7", "i9"]),
    ]:
        store, triton = _world()
        pipe = _pipeline(store, triton, FEATURES_UP)
        store.slow[slow_call] = 0.2  # the reads may use 0.75 of the 0.25 s deadline
        deadline = Deadline.after(0.25)
        rec = pipe.recommend("u1", 3, Filters(("A",)), deadline)
        assert not deadline.expired(), slow_call
        assert [c.item_id for c in rec.items] == popular, slow_call
        assert rec.reasons == ["popular overall"] * 3
        assert len(rec.degraded) == 1 and rec.degraded[0].startswith("milvus unavailable: too slow")
        assert not rec.ranked


def test_ranker_not_ready_or_failing_keeps_retrieval_order() -> None:
    store, triton = _world()
    not_ready = RankerStatus(deployed=True, ready=False)
    pipe = _pipeline(store, triton, Rankers(features=not_ready))
    rec = pipe.recommend("u1", 3, Filters(), Deadline.after(5))
    assert rec.degraded == ["feature ranker unavailable: triton not ready"]
    assert not rec.ranked and all(c.relevance == c.fused for c in rec.items)
    triton.down = True
    pipe = _pipeline(store, triton, BOTH_UP, cross_encoder_top=3)
    rec = pipe.recommend("u1", 3, Filters(), Deadline.after(5))
    assert rec.degraded == [
        "feature ranker unavailable: feature_ranker: connection refused",
        "cross-encoder unavailable: ranker_scorer: connection refused",
    ]
    assert not rec.ranked


def test_each_item_is_explained_by_its_best_source() -> None:
    store, triton = _world()
    pipe = _pipeline(store, triton, Rankers())
    rec = pipe.recommend("u1", 12, Filters(), Deadline.after(5), diversity=0.0)
    reasons = dict(zip((c.item_id for c in rec.items), rec.reasons, strict=True))
    assert reasons["i5"] == "similar to i4 you liked"  # ANN rank 0, nearest to i4
    assert reasons["i9"] == "popular in your segment"
    store.items["i5"] |= {"popularity": 0.0, "created_at": int(time.time()) - 3600}
    rec = pipe.recommend("u1", 12, Filters(), Deadline.after(5), diversity=0.0)
    reasons = dict(zip((c.item_id for c in rec.items), rec.reasons, strict=True))
    assert reasons["i5"] == "new in A"  # no popularity yet, created an hour ago
