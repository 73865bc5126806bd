"""Stage ``retrieval``: fusion with per-source quotas, request filters, the popularity cache,
and the Milvus filter literals built from client strings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np
import pytest

from services.recommend import retrieve
from services.recommend.context import Filters
from services.recommend.retrieve import FLOOR_SHARE, POPULARITY_FIELDS, PopularItems, Retriever
from services.vectors.store import Row, VectorStore, literal
from tests.services.recommend.fakes import FakeStore, row


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


def test_filters_and_popularity_cache() -> None:
    f = Filters(("Drama",), frozenset({"x"}))
    assert f.admits(row("y", ("Drama", "War")))
    assert not f.admits(row("x", ("Drama",)))
    assert not f.admits(row("z", ("Comedy",)))
    cache = PopularItems(size=3)
    cache._items = [row("a", ("A",), 9), row("b", ("B",), 5), row("c", ("A",), 1)]
    assert [r["item_id"] for r in cache.top(2, ("A",))] == ["a", "c"]
    assert [r["item_id"] for r in cache.top(5, (), {"a"})] == ["b", "c"]


def test_popularity_cache_keeps_the_catalogues_clock_for_the_ranker() -> None:
    from typing import cast

    from services.vectors.store import VectorStore
    from tests.services.recommend.fakes import FakeStore

    items = [row(i, pop=p) | {"created_at": t} for i, p, t in (("a", 2, 50), ("b", 7, 0))]
    cache = PopularItems(size=1)
    assert cache.refresh(cast(VectorStore, FakeStore(items)))
    clock = cache.clock()
    assert (clock.top_popularity, clock.now) == (7.0, 50.0)  # the newest item, not the wall
    assert [r["item_id"] for r in cache.top(5)] == ["b"]


def catalogue(n: int, seed: int) -> list[Row]:
    rng = np.random.default_rng(seed)
    pops = rng.integers(0, 20, n).astype(float)  # many ties: the order by id must hold too
    return [
        row(f"i{k:04d}", pop=p) | {"text": "long text " * 50, "created_at": 100 + k}
        for k, p in enumerate(pops)
    ]


def test_the_refresh_reads_every_items_popularity_and_the_tops_rows_only() -> None:
    items = catalogue(300, 0)
    store = FakeStore(items)
    cache = PopularItems(size=10)
    assert cache.refresh(cast(VectorStore, store))
    assert store.scanned == [POPULARITY_FIELDS]  # no texts for the whole catalogue
    expected = sorted(items, key=lambda r: (-r["popularity"], r["item_id"]))[:10]
    assert store.read == [[r["item_id"] for r in expected]]
    assert cache.top(20) == [{k: v for k, v in r.items()} for r in expected]  # full rows
    assert cache.clock().now == 399.0 and cache.clock().top_popularity == 19.0


@pytest.mark.parametrize("limit", [40, 16_384], ids=["bisected", "first-count"])
def test_a_catalogue_larger_than_the_item_cache_is_read_above_a_floor(
    limit: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first refresh reads the items above a floor that Milvus counts found (at least
    the top's size, fewer than a query's limit) and the newest items, not every item; the
    next ones the items above half the top's least popularity and those created since the
    clock's time, with the same top; a new item below the floor still moves the clock, and
    a re-index that drops the top below the floor is read whole again."""
    monkeypatch.setattr(retrieve, "QUERY_LIMIT", limit)
    items = catalogue(400, 0)
    store = FakeStore(items)
    store.item_cache_size = 100
    cache = PopularItems(size=15)
    assert cache.refresh(cast(VectorStore, store))
    expected = sorted(items, key=lambda r: (-r["popularity"], r["item_id"]))[:15]
    assert store.scanned == [] and cache.top(15) == expected
    (first, _, _), (_, since, _) = store.filtered
    assert 15 <= sum(r["popularity"] >= first for r in items) < limit
    assert 0 < sum(r["created_at"] >= since for r in items) < limit
    assert cache.clock().now == 499.0 and cache.clock().top_popularity == 19.0
    assert len(store.counted) <= 2 * retrieve.SEARCH_STEPS
    store.filtered.clear()
    floor = FLOOR_SHARE * expected[-1]["popularity"]
    store.items["new"] = row("new", pop=0.0) | {"created_at": 1000}
    assert cache.refresh(cast(VectorStore, store))
    assert store.filtered == [(floor, None, None), (None, 499, None)]
    assert cache.top(15) == expected
    assert cache.clock().now == 1000.0 and cache.clock().top_popularity == 19.0
    assert len(cache._popularity) == sum(r["popularity"] >= floor for r in items)
    for r in store.items.values():  # a re-index: every popularity a tenth
        r["popularity"] /= 10
    assert cache.refresh(cast(VectorStore, store))
    assert store.scanned == [POPULARITY_FIELDS]  # too few above the floor: all of it
    assert [r["item_id"] for r in cache.top(15)] == [r["item_id"] for r in expected]


@pytest.mark.parametrize(
    "pops",
    [[5.0] * 400, [3.0] * 10 + [0.0] * 390, [0.0] * 400],
    ids=["one-value", "top-reaching-zero", "no-popularity"],
)
def test_a_first_floor_that_ties_leave_unfound_still_gives_the_whole_top(
    pops: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where every item shares one popularity no count lies between the top's size and the
    limit: the floor under it reads them all. Where fewer than the top's size have any
    popularity, those are read and the first of the rest in id order, not every item, at
    this refresh and the next."""
    monkeypatch.setattr(retrieve, "QUERY_LIMIT", 40)
    items = [row(f"i{k:04d}", pop=p) | {"created_at": k} for k, p in enumerate(pops)]
    items.reverse()  # the store's order is not the order by id
    store = FakeStore(items)
    store.item_cache_size = 100
    cache = PopularItems(size=15)
    expected = sorted(items, key=lambda r: (-r["popularity"], r["item_id"]))[:15]
    for _ in range(2):
        assert cache.refresh(cast(VectorStore, store))
        assert [r["item_id"] for r in cache.top(15)] == [r["item_id"] for r in expected]
        assert cache.clock().now == 399.0
    assert store.scanned == [] and not cache._complete
    assert len(store.counted) <= 2 * (retrieve.SEARCH_STEPS + 1)
    assert len(cache._popularity) == (400 if pops[-1] else 15)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("whole", [True, False], ids=["whole", "above-floor"])
def test_online_scores_rank_as_over_the_whole_catalogue(seed: int, whole: bool) -> None:
    """The top over the catalogue's top and the online items equals the top over every item,
    and only lifted items' rows are read, a bounded number kept; read above the floor
    (a catalogue larger than the item cache), the online items below it are read by id,
    each once (an id with no item too)."""
    items = catalogue(400, seed)
    store = FakeStore(items)
    store.item_cache_size = 1000 if whole else 100
    cache = PopularItems(size=15)
    for _ in range(2):
        assert cache.refresh(cast(VectorStore, store))
    assert cache._complete == whole
    rng = np.random.default_rng(seed + 100)
    for _ in range(3):
        lifted = rng.choice(len(items), 40, replace=False)
        online = {items[k]["item_id"]: float(rng.uniform(0, 25)) for k in lifted}
        online["not-in-the-catalogue"] = 1000.0
        weight = float(rng.uniform(0.1, 1.0))
        store.read.clear()
        cache.set_online(online, {}, indexed_weight=weight)
        score = {
            r["item_id"]: r["popularity"] * weight + online.get(r["item_id"], 0.0) for r in items
        }
        brute = sorted(score, key=lambda i: (-score[i], i))[:15]
        assert [r["item_id"] for r in cache.top(15)] == brute
        assert all(set(ids) <= set(online) for ids in store.read)  # only lifted items read
        assert len(cache._rows) <= 30
    by_id = [i for _, _, ids in store.filtered if ids is not None for i in ids]
    assert len(by_id) == len(set(by_id)) and ("not-in-the-catalogue" in by_id) != whole


def test_a_lifted_item_whose_row_cannot_be_read_is_left_out_until_it_can() -> None:
    items = [row(i, pop=p) for i, p in (("a", 9.0), ("b", 5.0), ("c", 0.0))]
    store = FakeStore(items)
    cache = PopularItems(size=2)
    assert cache.refresh(cast(VectorStore, store))
    store.down.add("get_items")
    cache.set_online({"c": 6.0}, {})
    assert [r["item_id"] for r in cache.top(5)] == ["a", "b"]  # no crash, the rest served
    store.down.clear()
    cache.set_online({"c": 6.0}, {})
    assert [r["item_id"] for r in cache.top(5)] == ["a", "c"]


def test_an_item_deleted_between_the_scan_and_the_rows_read_is_not_served() -> None:
    items = [row(i, pop=p) for i, p in (("a", 9.0), ("b", 5.0), ("c", 1.0))]
    store = FakeStore(items)
    scan = store.all_items

    def scan_then_delete(
        fields: Sequence[str] | None = None, fill_cache: bool = False, fits: bool | None = None
    ) -> list[Row]:
        rows = scan(fields, fill_cache, fits)
        del store.items["a"]
        return rows

    store.all_items = scan_then_delete  # type: ignore[method-assign]
    cache = PopularItems(size=2)
    assert cache.refresh(cast(VectorStore, store))
    assert [r["item_id"] for r in cache.top(5)] == ["b"]
    cache.discard("b")
    assert cache.top(5) == []


def test_milvus_literals_escape_client_strings() -> None:
    assert literal('Sci "Fi') == '"Sci \\"Fi"'
    assert literal(["a\\b", "c"]) == '["a\\\\b", "c"]'


class _ReadsStore:
    """FakeStore that records the ids of every ``get_items`` read."""

    def __init__(self, items: list[dict[str, object]]) -> None:
        from tests.services.recommend.fakes import FakeStore

        self.inner = FakeStore(items)
        self.reads: list[list[str]] = []

    def get_items(self, ids: object, timeout: float, **kw: bool) -> dict[str, dict[str, object]]:
        self.reads.append(list(ids))  # type: ignore[call-overload]
        return self.inner.get_items(self.reads[-1], timeout, **kw)


def _admitted(
    store: _ReadsStore, lists: dict[str, list[str]], filters: Filters, n: int
) -> dict[str, list[str]]:
    from typing import cast

    from services.deadline import Deadline
    from services.vectors.store import VectorStore

    retriever = Retriever(cast(VectorStore, store), PopularItems(size=1))
    found, rows = retriever.admitted(lists, ["p"], filters, n, Deadline.after(5))
    assert "p" in rows  # the popular ids' rows come with the first read
    return {name: [r["item_id"] for r in found_rows] for name, found_rows in found.items()}


def test_admitted_reads_only_as_far_down_each_list_as_it_must() -> None:
    items = [row(f"c{i}") for i in range(9)] + [row(f"s{i}", ("B",)) for i in range(9)]
    store = _ReadsStore([*items, row("p")])
    lists = {"co": [f"c{i}" for i in range(9)], "seg": [f"s{i}" for i in range(9)]}
    # no attribute filter: the first 3 ids of each list are the answer, ~a third of the rows
    assert _admitted(store, lists, Filters(), 3) == {
        "co": ["c0", "c1", "c2"],
        "seg": ["s0", "s1", "s2"],
    }
    assert store.reads == [["c0", "c1", "c2", "s0", "s1", "s2", "p"]]
    # an id with no row (a deleted item) leaves its list short: the rest of it is read
    store.reads.clear()
    lists["co"][1] = "gone"
    assert _admitted(store, lists, Filters(), 3)["co"] == ["c0", "c2", "c3"]
    assert store.reads[1] == [f"c{i}" for i in range(3, 9)]
    # an attribute filter can refuse any row: every id in one read, as before
    store.reads.clear()
    only_b = Filters(("B",))
    assert _admitted(store, lists, only_b, 3) == {"co": [], "seg": ["s0", "s1", "s2"]}
    assert len(store.reads) == 1 and len(store.reads[0]) == 19


def test_the_ann_asks_for_as_many_hits_as_the_in_memory_filters_can_drop() -> None:
    from services.recommend.retrieve import ann_limit

    searched = Filters(("Drama",), frozenset({"recent1", "recent2"}))  # what Milvus applies
    kept = Filters(("Drama",), searched.exclude | {"old1", "old2", "old3"})
    assert ann_limit(100, searched, searched) == 100
    assert ann_limit(100, searched, kept) == 103  # three ids only the memory filter drops
    many = Filters(("Drama",), searched.exclude | {f"old{i}" for i in range(500)})
    assert ann_limit(100, searched, many) == 200  # at most twice
    by_age = Filters(("Drama",), kept.exclude, min_created_at=5)  # Milvus does not apply it
    assert ann_limit(100, searched, by_age) == 200


def test_admitted_is_admits_applied_in_order() -> None:
    rows = [row("a", ("Drama",)), row("b", ("War",)), row("x", ("Drama",)), row("c", ("Drama",))]
    by_id = Filters((), frozenset({"x"}))
    by_attributes = Filters(("Drama",), frozenset({"x"}))
    for f in (by_id, by_attributes):
        assert f.admitted(rows) == [r for r in rows if f.admits(r)]
    assert [r["item_id"] for r in by_attributes.admitted(iter(rows))] == ["a", "c"]


def test_retrieval_shares_its_co_occurrence_scores_only_when_they_are_the_rankers() -> None:
    """The ranker's co-occurrence feature uses the indexed neighbours alone (as in training);
    retrieval interleaves the online ones. Its scores are handed on only when that changed
    nothing, so the feature is the same either way."""
    from typing import cast

    from core.ranking_features import co_occurrence_scores
    from services.vectors.store import VectorStore

    history = [
        row("h1") | {"title": "H1", "co_items": ["a", "b", "c"]},
        row("h2") | {"title": "H2", "co_items": ["c", "d"]},
    ]
    own, _ = co_occurrence_scores([h["co_items"] for h in history])
    cache = PopularItems(size=1)
    retriever = Retriever(cast(VectorStore, None), cache)
    ids, because, shared = retriever.co_occurrence(history, 5, exclude=set())
    assert shared == own and ids[0] == "c" and because["c"] == "H2"  # 0.9 / 1 > 1 / 3
    cache.set_online({}, {"h2": ["x"]})  # a new neighbour
    ids, _, shared = retriever.co_occurrence(history, 5, exclude=set())
    assert shared is None and "x" in ids
    cache.set_online({}, {"h1": ["c"]})  # a known one moved up: the same ids, other scores
    ids, _, shared = retriever.co_occurrence(history, 5, exclude=set())
    assert shared is None and set(ids) == set(own)
    cache.set_online({}, {})
    duplicated = [history[0] | {"co_items": ["a", "a", "b"]}]  # deduplicated by retrieval
    assert retriever.co_occurrence(duplicated, 5, exclude=set())[2] is None
