"""Which consistency level each kind of read asks for, and what the store derives from the
server's version and the search size (no Milvus: a fake client records the calls)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from core.config import Settings
from services.vectors.store import VectorStore
from tests.services.vectors.search_hits import Hits


class FakeClient:
    def __init__(self, version: str = "v2.3.5-lite") -> None:
        self.version = version
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.user = {"user_id": "u1", "vector": [0.0] * 8, "segment": "", "interests": {}}
        self.deleted = False

    def __getattr__(self, method: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((method, kwargs))
            if method == "get_server_version":
                return self.version
            if method == "search":
                return [Hits([], [])]
            if method == "upsert":
                return {"upsert_count": len(args[1])}
            if method == "delete":
                self.deleted = True
            if method == "query" and "user_id" in kwargs["filter"] and not self.deleted:
                return [dict(self.user)]
            return []

        return call

    def levels(self, method: str) -> list[Any]:
        return [kw.get("consistency_level") for m, kw in self.calls if m == method]


def _store(client: FakeClient, **settings: Any) -> VectorStore:
    store = VectorStore(Settings(embedding_dim=8, **settings))
    store._client = client  # type: ignore[assignment]
    return store


def test_reads_use_the_level_of_their_kind() -> None:
    client = FakeClient()
    store = _store(client)
    store.get_items(["a"], 1.0)
    store.search_items(np.ones(8), 10, 1.0)
    store.nearest_segment(np.ones(8), 1.0)
    store.get_segment("s", 1.0)
    assert client.levels("query") == ["Session", "Session"]
    assert client.levels("search") == ["Session", "Session"]
    client.calls.clear()
    store.get_user("u", 1.0)
    assert client.levels("query") == ["Session"]
    client.calls.clear()
    store.get_items(["a"], 1.0, consistency="Strong")  # before an item upsert
    assert client.levels("query") == ["Strong"]


def test_levels_are_settings() -> None:
    client = FakeClient()
    store = _store(client, milvus_item_consistency="Bounded", milvus_user_consistency="Strong")
    store.get_items(["a"], 1.0)
    store.get_user("u", 1.0)
    assert client.levels("query") == ["Bounded", "Strong"]
    with pytest.raises(ValueError):
        Settings(milvus_user_consistency="Customized")


def test_delete_user_confirms_with_a_strong_read() -> None:
    client = FakeClient()
    _store(client).delete_user("u", 1.0)
    assert [m for m, _ in client.calls] == ["query", "delete", "query"]
    assert client.levels("query") == ["Session", "Strong"]


def test_hnsw_ef_is_raised_to_the_limit() -> None:
    client = FakeClient()
    store = _store(client, search_params={"ef": 128})
    store.search_items(np.ones(8), 10, 1.0)
    store.search_items(np.ones(8), 200, 1.0)
    efs = [kw["search_params"]["params"]["ef"] for m, kw in client.calls if m == "search"]
    assert efs == [128, 200]


@pytest.mark.parametrize(
    ("version", "partial"),
    [("v2.3.5-lite", False), ("v2.6.1", False), ("v2.6.2", True), ("milvus_lite-3.2.2", True)],
)
def test_segment_writes_are_partial_only_where_the_server_has_them(
    version: str, partial: bool
) -> None:
    client = FakeClient(version)
    _store(client).set_user_segments({"u1": "s1"})
    upserts = [kw for m, kw in client.calls if m == "upsert"]
    assert len(upserts) == 1
    assert upserts[0].get("partial_update", False) is partial


def test_flush_seals_every_collection_before_waiting_for_any() -> None:
    """The server takes up each collection's indexed segments in the same ~19 s: sealed one
    by one and waited for in turn, three collections took 59 s on the 2.3 engine."""

    class Indexing(FakeClient):
        def __init__(self) -> None:
            super().__init__("v2.3.5")
            self.order: list[tuple[str, str]] = []
            self.polls = 0

        def flush(self, name: str, **_: Any) -> None:
            self.order.append(("flush", name))

        def query(self, name: str, **kw: Any) -> list[dict[str, int]]:
            assert kw["output_fields"] == ["count(*)"] and kw["consistency_level"] == "Strong"
            return [{"count(*)": 5}]

        def describe_index(self, name: str, field: str, **_: Any) -> dict[str, int]:
            self.order.append(("describe_index", name))
            self.polls += 1  # every collection indexed from the second round of polls on
            return {"indexed_rows": 5, "total_rows": 5, "pending_index_rows": self.polls <= 3}

        def list_loaded_segments(self, name: str, **_: Any) -> list[Any]:
            return [type("Segment", (), {"num_rows": 5, "state": "Sealed"})()]

    client = Indexing()
    store = _store(client)
    store.flush(timeout=10.0)
    names = [spec.name for spec in store.specs]
    assert client.order[: len(names)] == [("flush", n) for n in names]
    assert [m for m, _ in client.order].count("flush") == len(names)
    assert client.polls == 2 * len(names)  # one round waiting, one round done, all together


def test_flush_waits_for_every_row_written_not_the_index_total() -> None:
    """The index's own total may not count every row written yet: the flush waits until
    the rows counted at Strong are indexed and served sealed."""

    class Catching(FakeClient):
        def __init__(self) -> None:
            super().__init__("v2.3.5")
            self.polls = 0

        def flush(self, name: str, **_: Any) -> None:
            pass

        def query(self, name: str, **_: Any) -> list[dict[str, int]]:
            return [{"count(*)": 8}]

        def describe_index(self, name: str, field: str, **_: Any) -> dict[str, int]:
            self.polls += 1
            rows = 2 if self.polls <= 6 else 8  # a quarter counted for two rounds of polls
            return {"indexed_rows": rows, "total_rows": rows, "pending_index_rows": 0}

        def list_loaded_segments(self, name: str, **_: Any) -> list[Any]:
            rows = 2 if self.polls <= 9 else 8  # and served sealed a round later
            return [type("Segment", (), {"num_rows": rows, "state": "Sealed"})()]

    client = Catching()
    store = _store(client)
    store.flush(timeout=10.0)
    assert client.polls == 4 * len(store.specs)
