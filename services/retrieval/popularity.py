"""The most popular items, cached in the gateway.

Cold-start users get these, and so does every user while Milvus is unreachable: the cache is
filled from Milvus at start and refreshed in the background, and it keeps its last good
contents when a refresh fails.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Sequence

from services.vectors.store import Row, StoreUnavailable, VectorStore

log = logging.getLogger(__name__)


class PopularItems:
    """Top items by popularity, with category and exclusion filters applied on read."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: list[Row] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def refresh(self, store: VectorStore) -> bool:
        try:
            rows = store.all_items()
        except StoreUnavailable as exc:
            log.warning("popularity refresh failed, keeping %d cached: %s", len(self), exc)
            return False
        rows.sort(key=lambda r: (-float(r["popularity"]), r["item_id"]))
        with self._lock:
            self._items = rows[: self.size]
        return True

    def top(
        self, k: int, categories: Sequence[str] = (), exclude: Collection[str] = ()
    ) -> list[Row]:
        wanted, skip = set(categories), set(exclude)
        with self._lock:
            items = self._items
        out = []
        for row in items:
            if row["item_id"] in skip or (wanted and not wanted.intersection(row["categories"])):
                continue
            out.append(row)
            if len(out) == k:
                break
        return out
