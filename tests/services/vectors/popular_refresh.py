"""The popularity cache's first refresh against a real store (Milvus Lite, the engine): a
catalogue larger than the item cache is read above a floor that Milvus counts found."""

from __future__ import annotations

import numpy as np
import pytest

from core.rows import item_row
from services.recommend import retrieve
from services.recommend.retrieve import PopularItems
from services.vectors.store import VectorStore

N_ITEMS = 300
TOP = 25


def check_first_refresh(
    store: VectorStore, monkeypatch: pytest.MonkeyPatch, popular: int = N_ITEMS
) -> None:
    """Writes ``N_ITEMS`` items (popularity with ties, the newest item far below the top;
    any popularity on ``popular`` of them only) to a store whose item cache holds fewer;
    the first refresh must give the top and clock that every item gives, without reading
    every item."""
    rng = np.random.default_rng(3)
    pops = rng.integers(0, 30, N_ITEMS).astype(float)
    pops[rng.permutation(N_ITEMS)[popular:]] = 0.0
    pops[-1] = 0.0  # the newest item is not popular: the clock must still find it
    vectors = rng.normal(size=(N_ITEMS, store.settings.embedding_dim)).astype(np.float32)
    rows = [
        item_row(f"p{k:03d}", f"t{k}", ["Drama"], "", popularity=p, created_at=5000 + k, vector=v)
        for k, (p, v) in enumerate(zip(pops, vectors, strict=True))
    ]
    store.upsert_items(rows)
    monkeypatch.setattr(retrieve, "QUERY_LIMIT", 60)  # a floor bisected, not the first count
    scans: list[object] = []

    def all_items(*args: object, **kwargs: object) -> list[object]:
        scans.append(args)
        return []

    monkeypatch.setattr(store, "all_items", all_items)
    cache = PopularItems(size=TOP)
    assert cache.refresh(store)
    assert not store.item_cache_holds_catalogue() and scans == []
    brute = sorted(rows, key=lambda r: (-r["popularity"], r["item_id"]))[:TOP]
    assert [r["item_id"] for r in cache.top(TOP)] == [r["item_id"] for r in brute]
    assert cache.clock().now == 5000 + N_ITEMS - 1 and cache.clock().top_popularity == pops.max()
    assert TOP <= len(cache._popularity) < 60
