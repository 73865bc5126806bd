"""Item pages, item deletion and counts against Milvus (an embedded Milvus Lite file): keyset
pages cover the catalogue once, in id order, whatever order the items were written in; the
popularity cache's first refresh finds its floor by Lite's counts."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from core.config import Settings
from core.rows import item_row
from services.vectors import store as store_module
from services.vectors.store import VectorStore
from tests.services.vectors.popular_refresh import N_ITEMS as POPULAR_ITEMS
from tests.services.vectors.popular_refresh import check_first_refresh

DIM = 8
N_ITEMS = 230


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[VectorStore]:
    store = VectorStore(Settings(milvus_uri=str(tmp_path / "milvus.db"), embedding_dim=DIM))
    store.ensure_collections()
    ids = [f"item-{n:04d}" for n in range(N_ITEMS)]
    random.Random(0).shuffle(ids)  # written out of order, in several batches
    rng = np.random.default_rng(0)
    for start in range(0, N_ITEMS, 40):
        rows = [
            item_row(i, f"title {i}", ["Drama"], "", vector=rng.normal(size=DIM))
            for i in ids[start : start + 40]
        ]
        store.upsert_items(rows)
    try:
        yield store
    finally:
        store.close()


@pytest.mark.parametrize(
    ("query_limit", "rounds"),
    [(None, None), (120, None), (120, 0)],
    ids=["by-ids", "narrowed", "iterator"],
)
def test_pages_cover_the_catalogue_once_in_id_order(
    store: VectorStore,
    monkeypatch: pytest.MonkeyPatch,
    query_limit: int | None,
    rounds: int | None,
) -> None:
    """By a query of the matching ids; where more match than a query returns (120 here),
    by narrowing the filter below the page's last id; or by a query iterator's first page."""
    if query_limit is not None:
        monkeypatch.setattr(store_module, "QUERY_LIMIT", query_limit)
    if rounds is not None:
        monkeypatch.setattr(store_module, "NARROWING_ROUNDS", rounds)
    queries: list[str] = []
    call = store._call

    def counted(method: str, *args: object, **kwargs: object) -> object:
        queries.append(method)
        return call(method, *args, **kwargs)

    monkeypatch.setattr(store, "_call", counted)
    seen: list[str] = []
    after = ""
    while True:
        page = store.list_items(after, 50, 10.0)
        seen += [r["item_id"] for r in page]
        if len(page) < 50:
            break
        after = page[-1]["item_id"]
    assert seen == sorted(f"item-{n:04d}" for n in range(N_ITEMS))
    assert ("query_iterator" in queries) == (rounds == 0)
    assert set(store.list_items("", 1, 10.0)[0]) >= {"item_id", "title", "categories"}


@pytest.mark.parametrize("query_limit", [None, 100], ids=["by-keys", "iterator"])
@pytest.mark.parametrize("batch", [7, None], ids=["pages-of-7", "default"])
def test_a_scan_reads_every_row_once(
    store: VectorStore, monkeypatch: pytest.MonkeyPatch, batch: int | None, query_limit: int | None
) -> None:
    """By plain queries (the keys, then their rows a page at a time), or, where more rows
    match than one query returns (100 here), by a query iterator."""
    if query_limit is not None:
        monkeypatch.setattr(store_module, "QUERY_LIMIT", query_limit)
    rows = store.scan(store.items.name, ["item_id", "title"], batch=batch)
    assert sorted(r["item_id"] for r in rows) == [f"item-{n:04d}" for n in range(N_ITEMS)]
    assert {r["title"] for r in rows} == {f"title item-{n:04d}" for n in range(N_ITEMS)}


def test_deleted_item_is_gone_from_reads_and_pages(store: VectorStore) -> None:
    assert store.get_items(["item-0007"], 10.0)  # read once: cached, if the cache is on
    assert store.delete_item("item-0007", 10.0) is True
    assert store.get_items(["item-0007"], 10.0) == {}
    ids = [r["item_id"] for r in store.list_items("item-0005", 3, 10.0)]
    assert ids == ["item-0006", "item-0008", "item-0009"]
    assert store.delete_item("item-0007", 10.0) is False


@pytest.mark.parametrize("popular", [POPULAR_ITEMS, 10], ids=["all-popular", "ten-popular"])
def test_a_first_popularity_refresh_counts_in_milvus_lite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, popular: int
) -> None:
    settings = Settings(
        milvus_uri=str(tmp_path / "counts.db"), embedding_dim=DIM, milvus_item_cache_size=50
    )
    store = VectorStore(settings)
    store.ensure_collections()
    try:
        check_first_refresh(store, monkeypatch, popular)
    finally:
        store.close()
