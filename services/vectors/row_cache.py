"""A bounded in-process cache of Milvus rows by primary key, with a TTL: item rows (with
vectors and neighbours) and user profiles.

Returning vectors, not searching, is what a ``Recommend`` paid Milvus for (measured on the
2.3 engine, 2,000 items: 200 items by id with vectors 29 ms, a search for 200 returning
their vectors 33 ms against 14 ms returning ids). Item rows change rarely (``UpsertItems``,
indexing jobs, the popularity refresh), so the gateway keeps the rows it has read:

- least recently used rows leave first once ``size`` rows are kept (0 turns it off);
- a row is served for ``ttl_s`` after it was read, then read again: writes of other
  processes (another gateway replica's ``UpsertItems``, an indexing job) reach this one
  within ``ttl_s``;
- this process's own writes invalidate their keys at once; a read that was in flight
  across such a write does not store what it read (:meth:`epoch`), so it cannot put the
  old row back;
- a key Milvus does not have is kept as absent for as long (retrieval asks for ids of other
  sources, such as the sequence model's, that the catalogue may lack, request after request).

User profiles are written by other processes (the profile workers) at every event, so a
TTL alone would serve stale histories: the store serves a cached profile only when the event
log vouches that it is the newest (:meth:`services.vectors.store.VectorStore.get_user`).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

Row = dict[str, Any]


class RowCache:
    """Rows by key, least recently used out first, each kept at most ``ttl_s``."""

    def __init__(
        self, size: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.size = size
        self.ttl_s = ttl_s
        self._clock = clock
        self._rows: OrderedDict[str, tuple[float, Row | None]] = OrderedDict()  # None: absent
        self._epoch = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.size > 0

    def __len__(self) -> int:
        return len(self._rows)

    def epoch(self) -> int:
        """Take this before reading Milvus and hand it to :meth:`put`."""
        return self._epoch

    def get(self, ids: Iterable[str]) -> tuple[dict[str, Row], list[str]]:
        """The fresh rows kept for ``ids``, and the ids to read from Milvus (neither: ids
        known to be absent)."""
        now = self._clock()
        found: dict[str, Row] = {}
        missing: list[str] = []
        with self._lock:
            for key in ids:
                entry = self._rows.get(key)
                if entry is None or now - entry[0] > self.ttl_s:
                    missing.append(key)
                    continue
                self._rows.move_to_end(key)
                if entry[1] is not None:
                    found[key] = entry[1]
            self.hits += len(found)
            self.misses += len(missing)
        return found, missing

    def holds(self, key: str) -> bool:
        """Whether :meth:`get` would answer for ``key`` now (a row, or known absent) without
        a Milvus read; counts neither a hit nor a miss."""
        with self._lock:
            entry = self._rows.get(key)
            return entry is not None and self._clock() - entry[0] <= self.ttl_s

    def put(self, rows: Mapping[str, Row | None], epoch: int) -> None:
        """Keep rows read since ``epoch`` (None: Milvus has no such key), unless an
        invalidation came meanwhile."""
        if not self.enabled:
            return
        now = self._clock()
        with self._lock:
            if epoch != self._epoch:
                return
            for key, row in rows.items():
                self._rows[key] = (now, row)
                self._rows.move_to_end(key)
            while len(self._rows) > self.size:
                self._rows.popitem(last=False)

    def invalidate(self, ids: Iterable[str]) -> None:
        """Forget ``ids`` (this process wrote them) and refuse reads that were in flight."""
        with self._lock:
            self._epoch += 1
            for key in ids:
                self._rows.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._epoch += 1
            self._rows.clear()
