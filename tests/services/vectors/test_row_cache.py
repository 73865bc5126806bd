"""The row cache (LRU, TTL, invalidation), how the store reads items and profiles through
it, and the per-request Milvus clock (no Milvus: a fake client serves rows and records the
calls)."""

from __future__ import annotations

import re
import threading
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from core.config import Settings
from core.milvus_schema import ITEM_FIELDS
from services.vectors.row_cache import RowCache
from services.vectors.store import VectorStore
from services.vectors.timing import milvus_clock, timed
from tests.services.vectors.search_hits import Hits


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lru_evicts_the_least_recently_used_row() -> None:
    cache = RowCache(2, 60.0)
    cache.put({"a": {"item_id": "a"}, "b": {"item_id": "b"}}, cache.epoch())
    assert set(cache.get(["a"])[0]) == {"a"}  # a is now the most recent
    cache.put({"c": {"item_id": "c"}}, cache.epoch())
    found, missing = cache.get(["a", "b", "c"])
    assert set(found) == {"a", "c"} and missing == ["b"]


def test_rows_expire_after_the_ttl() -> None:
    clock = Clock()
    cache = RowCache(10, 5.0, clock)
    cache.put({"a": {"item_id": "a"}, "gone": None}, cache.epoch())
    clock.now = 5.0
    assert cache.holds("a") and cache.holds("gone") and not cache.holds("b")
    assert cache.get(["a"])[1] == []
    clock.now = 5.1
    assert not cache.holds("a")
    assert cache.get(["a"])[1] == ["a"]


def test_a_read_in_flight_across_an_invalidation_is_not_kept() -> None:
    cache = RowCache(10, 60.0)
    epoch = cache.epoch()  # a read starts
    cache.invalidate(["a"])  # this process upserts a meanwhile
    cache.put({"a": {"item_id": "a", "title": "old"}}, epoch)  # the read ends with the old row
    assert cache.get(["a"])[1] == ["a"]
    cache.put({"a": {"item_id": "a", "title": "new"}}, cache.epoch())
    assert cache.get(["a"])[0]["a"]["title"] == "new"


def test_size_zero_keeps_nothing() -> None:
    cache = RowCache(0, 60.0)
    cache.put({"a": {"item_id": "a"}}, cache.epoch())
    assert not cache.enabled and len(cache) == 0


class ItemsClient:
    """Serves ``n`` items; records every call's method, filter ids and output fields."""

    def __init__(self, n: int = 5) -> None:
        self.rows: dict[str, dict[str, Any]] = {
            f"i{i}": {
                "item_id": f"i{i}",
                "title": f"t{i}",
                "categories": ["Drama"],
                "text": "",
                "popularity": float(i),
                "created_at": 0,
                "co_items": [f"i{(i + 1) % n}"],
                "vector": [float(i)] * 8,
            }
            for i in range(n)
        }
        self.calls: list[tuple[str, list[str], list[str], Any]] = []
        self.catalogue_counts = 0  # count(*) without a filter

    def query(self, collection: str, **kw: Any) -> list[dict[str, Any]]:
        where = kw["filter"]
        least = re.search(r"(popularity|created_at) >= ([\d.]+)", where)
        if least:  # the popularity refresh's floor or newest items
            field, value = least[1], float(least[2])
            matches = [i for i, r in self.rows.items() if r[field] >= value]
        else:  # ids listed, or (no filter) every item
            matches = re.findall(r'"(i\d+)"', where) if where else list(self.rows)
        if kw["output_fields"] == ["count(*)"]:
            self.catalogue_counts += not where
            return [{"count(*)": len(matches if where else self.rows)}]
        self.calls.append(("query", matches, kw["output_fields"], kw.get("consistency_level")))
        fields = kw["output_fields"]
        return [{f: self.rows[i][f] for f in fields} for i in matches if i in self.rows]

    def search(self, collection: str, **kw: Any) -> list[Hits]:
        self.calls.append(("search", [], kw["output_fields"], kw.get("consistency_level")))
        ids = ["i3", "i1", "i4"][: kw["limit"]]
        fields = kw["output_fields"]
        rows = [{"distance": 1.0 - n / 10, "entity": {f: self.rows[i][f] for f in fields}}
                for n, i in enumerate(ids)]  # fmt: skip
        return [Hits(ids, rows)]

    def query_iterator(self, collection: str, **kw: Any) -> Any:
        fields = kw["output_fields"]
        self.calls.append(("scan", [], fields, None))
        pages = [[{f: r[f] for f in fields} for r in self.rows.values()], []]
        return SimpleNamespace(next=lambda: pages.pop(0), close=lambda: None)

    def upsert(self, collection: str, rows: list[dict[str, Any]], **kw: Any) -> dict[str, int]:
        self.calls.append(("upsert", [r["item_id"] for r in rows], [], None))
        for row in rows:
            self.rows[row["item_id"]] = row
        return {"upsert_count": len(rows)}


def _store(client: ItemsClient, **settings: Any) -> VectorStore:
    store = VectorStore(Settings(embedding_dim=8, **settings))
    store._client = client  # type: ignore[assignment]
    return store


def test_item_reads_go_to_milvus_only_for_ids_the_cache_lacks() -> None:
    client = ItemsClient()
    store = _store(client)
    first = store.get_items(["i1", "i2"], 1.0)
    assert set(first["i1"]) == {"item_id", "title", "categories", "text", "popularity",
                                "created_at"}  # fmt: skip
    # the miss is read with every field, so a later caller wanting vectors finds them
    assert client.calls[-1][1:3] == (["i1", "i2"], [*first["i1"], "vector", "co_items"])
    client.calls.clear()
    got = store.get_items(["i2", "i3"], 1.0, with_vectors=True, with_neighbours=True)
    assert [c[1] for c in client.calls] == [["i3"]]
    np.testing.assert_array_equal(got["i2"]["vector"], np.full(8, 2.0, dtype=np.float32))
    assert got["i3"]["co_items"] == ["i4"]


def test_an_id_milvus_lacks_is_not_asked_for_again_until_written_or_expired() -> None:
    client = ItemsClient()
    store = _store(client)
    assert set(store.get_items(["i1", "i9"], 1.0)) == {"i1"}
    assert set(store.get_items(["i1", "i9"], 1.0)) == {"i1"}
    assert [c[1] for c in client.calls] == [["i1", "i9"]]
    row = {**client.rows["i1"], "item_id": "i9"}
    store.upsert_items([row])  # type: ignore[list-item]
    assert set(store.get_items(["i9"], 1.0)) == {"i9"}


def test_a_strong_read_bypasses_the_cache_and_an_upsert_invalidates_it() -> None:
    client = ItemsClient()
    store = _store(client)
    store.get_items(["i1"], 1.0)
    client.calls.clear()
    store.get_items(["i1"], 1.0, consistency="Strong")
    assert client.calls[-1][3] == "Strong"
    row = {**client.rows["i1"], "title": "renamed"}
    store.upsert_items([row])  # type: ignore[list-item]
    assert store.get_items(["i1"], 1.0)["i1"]["title"] == "renamed"


def test_the_ann_returns_ids_and_its_rows_come_from_the_cache() -> None:
    client = ItemsClient()
    store = _store(client)
    store.get_items(["i1", "i3", "i4"], 1.0)
    client.calls.clear()
    hits = store.search_items(np.ones(8), 3, 1.0, with_vectors=True)
    assert [c[0] for c in client.calls] == ["search"]
    assert client.calls[0][2] == []  # the primary keys come without asking
    assert [h["item_id"] for h in hits] == ["i3", "i1", "i4"]
    assert [h["score"] for h in hits] == [1.0, 0.9, 0.8] and "vector" in hits[0]


def test_the_catalogue_scan_fills_the_item_cache_when_the_catalogue_fits() -> None:
    client = ItemsClient()
    store = _store(client)
    rows = store.all_items(fill_cache=True)
    assert client.calls[-1][2] == [*ITEM_FIELDS, "vector", "co_items"]  # read whole once
    assert [set(r) for r in rows] == [set(ITEM_FIELDS)] * 5  # the caller gets what it asked
    client.calls.clear()
    got = store.get_items(["i0", "i4"], 1.0, with_vectors=True, with_neighbours=True)
    assert client.calls == [] and got["i4"]["co_items"] == ["i0"]
    assert set(store.search_items(np.ones(8), 3, 1.0)[0]) == {*ITEM_FIELDS, "score"}
    assert [c[0] for c in client.calls] == ["search"]


def test_a_catalogue_larger_than_the_item_cache_is_scanned_without_filling_it() -> None:
    client = ItemsClient()
    store = _store(client, milvus_item_cache_size=4)
    assert len(store.all_items(fill_cache=True)) == 5
    assert client.calls[-1][2] == ITEM_FIELDS and len(store.item_cache) == 0
    store = _store(ItemsClient())
    assert len(store.all_items()) == 5 and len(store.item_cache) == 0  # not asked to fill


def test_a_stale_answer_that_the_catalogue_fits_does_not_flood_the_item_cache() -> None:
    """The caller counted before the catalogue outgrew the cache: the scan's rows come back
    as asked, and the rows the cache held stay (none evicted for the scan's)."""
    client = ItemsClient()
    store = _store(client, milvus_item_cache_size=4)
    store.get_items(["i1", "i2"], 1.0)
    rows = store.all_items(("item_id", "title"), fill_cache=True, fits=True)
    assert [set(r) for r in rows] == [{"item_id", "title"}] * 5
    held, _ = store.item_cache.get(["i0", "i1", "i2", "i3", "i4"])
    assert sorted(held) == ["i1", "i2"]


@pytest.mark.parametrize("cache_size", [10, 4])
def test_the_popularity_refresh_reads_texts_of_the_top_only(cache_size: int) -> None:
    """A catalogue larger than the item cache: three fields of the items above a counted
    floor, then the top's rows by id, no scan. One that fits: the scan reads everything once
    (filling the cache) and the top's rows come from the cache, no second read. Either way
    the catalogue is counted once."""
    from services.recommend.retrieve import POPULARITY_FIELDS, PopularItems

    client = ItemsClient()
    store = _store(client, milvus_item_cache_size=cache_size)
    popular = PopularItems(size=2)
    assert popular.refresh(store)
    assert [r["title"] for r in popular.top(5)] == ["t4", "t3"]  # full rows, best first
    assert client.catalogue_counts == 1
    scans = [c[2] for c in client.calls if c[0] == "scan"]
    reads = [c[1] for c in client.calls if c[0] == "query"]
    if cache_size < len(client.rows):
        texts = [c[1] for c in client.calls if c[0] == "query" and "text" in c[2]]
        assert scans == [] and texts == [["i4", "i3"]]
        assert all(c[2] == list(POPULARITY_FIELDS) for c in client.calls if "text" not in c[2])
    else:  # every id, then every row whole once (a catalogue this small: no iterator)
        fields = [c[2] for c in client.calls if c[0] == "query"]
        assert scans == [] and fields == [["item_id"], [*ITEM_FIELDS, "vector", "co_items"]]
        assert reads == [list(client.rows)] * 2


def test_without_the_cache_every_read_goes_to_milvus() -> None:
    client = ItemsClient()
    store = _store(client, milvus_item_cache_size=0)
    store.get_items(["i1"], 1.0)
    store.get_items(["i1"], 1.0)
    hits = store.search_items(np.ones(8), 2, 1.0, with_vectors=True)
    assert [c[0] for c in client.calls] == ["query", "query", "search"]
    assert "vector" in client.calls[-1][2] and "vector" in hits[0]


class UsersClient:
    """Serves user rows by id; records each query's user id and consistency level."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []

    def write(self, user_id: str, version: int) -> None:
        """What a profile worker (another process) writes."""
        self.rows[user_id] = {"user_id": user_id, "version": version, "recent_items": ["i1"],
                              "vector": [0.0] * 8}  # fmt: skip

    def query(self, collection: str, **kw: Any) -> list[dict[str, Any]]:
        user_id = re.findall(r'"(u\d+)"', kw["filter"])[0]
        self.calls.append((user_id, kw["consistency_level"]))
        row = self.rows.get(user_id)
        return [{f: row[f] for f in kw["output_fields"] if f in row}] if row else []

    def upsert(self, collection: str, rows: list[dict[str, Any]], **kw: Any) -> dict[str, int]:
        for row in rows:
            self.rows[row["user_id"]] = row
        return {"upsert_count": len(rows)}

    def delete(self, collection: str, **kw: Any) -> None:
        self.rows.pop(re.findall(r'"(u\d+)"', kw["filter"])[0], None)


def _version(row: dict[str, Any] | None) -> Any:
    """A read user row's ``version`` (the row must be there)."""
    assert row is not None
    return row["version"]


def test_a_cached_profile_read_is_served_from_the_cache_and_an_uncached_one_never() -> None:
    client = UsersClient()
    store = _store(client)  # type: ignore[arg-type]
    client.write("u1", 5)
    assert _version(store.get_user("u1", 1.0, with_vector=False, cached=True)) == 5
    client.write("u1", 9)  # a worker's write: the gateway folds the log into the cached row
    assert _version(store.get_user("u1", 1.0, with_vector=False, cached=True)) == 5
    assert len(client.calls) == 1  # the second read came from the cache
    # uncached (the gateway while the log is down): Milvus every time
    assert _version(store.get_user("u1", 1.0, with_vector=False)) == 9
    assert _version(store.get_user("u1", 1.0, with_vector=False)) == 9
    assert len(client.calls) == 3
    # no row at all: remembered too (the gateway folds the log's events into none)
    assert store.get_user("u5", 1.0, with_vector=False, cached=True) is None
    assert store.get_user("u5", 1.0, with_vector=False, cached=True) is None
    assert [c[0] for c in client.calls[3:]] == ["u5"]
    # the vector is rewritten at the same version by the re-encode lane: never cached
    client.write("u2", 4)
    store.get_user("u2", 1.0, with_vector=True, cached=True)
    store.get_user("u2", 1.0, with_vector=True, cached=True)
    assert [c[0] for c in client.calls[-2:]] == ["u2", "u2"]
    assert all(level == "Session" for _, level in client.calls)


def test_this_process_s_writes_and_deletes_reach_the_cache_at_once() -> None:
    client = UsersClient()
    store = _store(client)  # type: ignore[arg-type]
    client.write("u1", 5)
    store.get_user("u1", 1.0, with_vector=False, cached=True)
    row = {**client.rows["u1"], "recent_items": ["i2"]}
    store.upsert_users([row])  # type: ignore[list-item]
    got = store.get_user("u1", 1.0, with_vector=False, cached=True)
    assert got is not None and got["recent_items"] == ["i2"]
    store.delete_user("u1", 1.0)
    client.write("u1", 5)  # the cache must not answer for a row this process deleted
    client.calls.clear()
    store.get_user("u1", 1.0, with_vector=False, cached=True)
    assert client.calls == [("u1", "Session")]
    off = _store(UsersClient(), milvus_user_cache_size=0)  # type: ignore[arg-type]
    assert not off.user_cache.enabled


def test_the_milvus_clock_sums_timed_calls_once_per_request_thread() -> None:
    @timed
    def call(seconds: float, inner: bool = False) -> None:
        time.sleep(seconds)
        if inner:
            call(seconds)  # counted with the outer call, not twice

    other: list[float] = []

    def elsewhere() -> None:
        with milvus_clock() as spent:
            call(0.05)  # another thread's request: its own clock
            other.append(spent.seconds)

    with milvus_clock() as spent:
        thread = threading.Thread(target=elsewhere)
        thread.start()
        call(0.1, inner=True)  # 0.2 s of wall time; counted twice it would be 0.3
        thread.join()
        assert 0.2 <= spent.seconds < 0.29
        assert spent.by_method.keys() == {"call"}
    call(0.001)  # no clock open: nothing to count, no error
    assert 0.05 <= other[0] < 0.2
