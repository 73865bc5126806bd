"""Item and user vectors in Milvus, through ``pymilvus``.

The same code talks to Milvus Lite (a local file, the default), a Milvus Lite server, or a
Milvus cluster: only ``RECSYS_MILVUS_URI`` changes. Every call takes a timeout (the caller's
remaining deadline). Strings from clients enter filter expressions only as JSON-escaped
literals (:func:`literal`), so ids and category names are data, never expression syntax
(Milvus Lite does not take ``filter_params`` templates).

Consistency is chosen per kind of read, not per collection: on a Milvus server a Strong read
waits for the next time tick (~200 ms at the default ``proxy.timeTickInterval``), which the
gateway cannot pay several times per ``Recommend``. Item and segment reads use
``RECSYS_MILVUS_ITEM_CONSISTENCY``, user-profile reads ``RECSYS_MILVUS_USER_CONSISTENCY``,
both Session by default: pymilvus keeps the last write timestamp of each collection per
process, so what this process upserted is visible to its next read (which waits for a time
tick once after each write), and every other read waits for nothing; writes of other
processes (indexing, segment refits) appear once Milvus has applied them. User rows are
written by the profile workers, so a profile read is given the row version they applied
(from the event log) and reads again at Strong when Session returned an older row. Bounded
would bound that lag (5 s) but lose the gateway's read-your-writes. The read before an item
upsert (which keeps the item's popularity and neighbours) is Strong, and the offline scans
keep the collections' level (Strong). Milvus Lite takes the levels and is always consistent.

Item rows are read through a bounded in-process cache (:mod:`services.vectors.row_cache`,
``RECSYS_MILVUS_ITEM_CACHE_SIZE``, ``RECSYS_MILVUS_ITEM_CACHE_TTL_S``): returning vectors was
most of what a ``Recommend`` paid Milvus for, so the ANN search returns ids only and item
reads by id ask Milvus only for the ids the cache lacks. This process's item upserts
invalidate their rows; other writers' reach it within the TTL. The read methods a request
makes are :func:`~services.vectors.timing.timed`: their wall time is the request's Milvus time.
Profiles go through a cache of their own (``RECSYS_MILVUS_USER_CACHE_SIZE``), served only
when the event log vouches for the cached row's version (:meth:`VectorStore.get_user`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from pymilvus import MilvusClient
from pymilvus.exceptions import MilvusException

from core.config import Settings
from core.milvus_schema import (
    CONSISTENCY,
    ITEM_FIELDS,
    SEGMENT_FIELDS,
    USER_FIELDS,
    USER_JSON_FIELDS,
    CollectionSpec,
    collections,
    index_params,
)
from core.rows import ItemRow, SegmentRow, UserRow
from services.vectors.row_cache import RowCache
from services.vectors.timing import timed

log = logging.getLogger(__name__)

Row = dict[str, Any]


def row_version(row: Mapping[str, Any] | None) -> int:
    """A user row's ``version``: the log sequence of the newest event it holds (0: none, or
    no row)."""
    return int(row.get("version") or 0) if row else 0


CONNECT_ATTEMPTS, CONNECT_RETRY_S = 2, 0.2  # see VectorStore._new_client
CONNECT_TIMEOUT_S = 5.0  # the longest connect, also for calls with a longer timeout
NOT_LOADED = 101  # Milvus's CollectionNotLoaded code, from the engine and Milvus Lite alike
QUERY_LIMIT = 16_384  # the most rows one query may return (offset + limit, Milvus 2.3)
NARROWING_ROUNDS = 4  # id-order reads: queries before a query iterator (_first_by_id)
VECTOR_SCAN_BATCH = 4096  # rows a scan's page holds when they carry vectors
# What a cached item row holds: every field, so that any later read finds what it needs.
CACHED_ITEM_FIELDS = (*ITEM_FIELDS, "vector", "co_items")


class StoreUnavailable(RuntimeError):
    """Milvus could not be reached or answered with an error."""


class StoreSchemaError(StoreUnavailable):
    """A collection exists with fields this version does not match: it needs re-indexing."""


class VectorStore:
    """Items and users collections; connects lazily and reconnects after failures."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.items, self.users, self.segments = collections(settings)
        self.specs = (self.items, self.users, self.segments)
        self._names = {spec.name for spec in self.specs}
        self._client: MilvusClient | None = None
        self._lock = threading.Lock()
        self._schema_checked = False
        self._version: str | None = None  # the server's, asked once
        self.item_cache = RowCache(
            settings.milvus_item_cache_size, settings.milvus_item_cache_ttl_s
        )
        self.user_cache = RowCache(
            settings.milvus_user_cache_size, settings.milvus_user_cache_ttl_s
        )

    # --- connection --------------------------------------------------------------------
    def _connect(self, timeout: float | None = None) -> MilvusClient:
        """The client, connected on first use, within ``timeout`` (the caller's, at most
        ``CONNECT_TIMEOUT_S``), waiting included: a Milvus that accepts connections but never
        answers held each read for two 5 s connects, and the reads queued on this lock
        behind it (three concurrent reads of 0.3 s took 10, 20 and 30 s, 2026-12-04)."""
        until = time.monotonic() + min(CONNECT_TIMEOUT_S, timeout or CONNECT_TIMEOUT_S)
        if not self._lock.acquire(timeout=max(until - time.monotonic(), 0.0)):
            uri = self.settings.milvus_uri
            raise StoreUnavailable(f"Milvus at {uri}: another call is still connecting")
        try:
            if self._client is None:
                self._client = self._new_client(until)
            return self._client
        finally:
            self._lock.release()

    def _new_client(self, until: float) -> MilvusClient:
        """A connected client by ``until`` (monotonic); a failed connect is tried once more
        if there is time.

        pymilvus shares one connection per address between clients and, when it has been idle,
        recovers it in place on the next connect. Milvus Lite closes idle connections
        (GOAWAY ``too_many_pings``: it refuses pymilvus's 10 s keepalive pings), and a
        recovery racing that close failed a connect with "Too many pings" in a CI run
        (2026-12-04). A second attempt after a pause recovers the connection anew (the real
        race was not reproduced; the unit test fakes the failure)."""
        s = self.settings
        failure: Exception | None = None
        for attempt in range(CONNECT_ATTEMPTS):
            if failure is not None:
                if until - time.monotonic() <= CONNECT_RETRY_S:
                    break
                log.info("Milvus connect %d failed (%s); trying again", attempt, failure)
                time.sleep(CONNECT_RETRY_S)
            left = until - time.monotonic()
            if left <= 0:
                break
            try:
                return MilvusClient(
                    uri=s.milvus_uri,
                    token=s.milvus_token.get_secret_value(),
                    db_name=s.milvus_db_name,
                    timeout=left,  # _connect capped ``until`` at CONNECT_TIMEOUT_S
                )
            except Exception as exc:  # pymilvus raises several types on connect
                failure = exc
        reason = failure or "no time left to connect"
        raise StoreUnavailable(f"Milvus at {s.milvus_uri}: {reason}") from failure

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        client = self._connect(kwargs.get("timeout"))
        try:
            return getattr(client, method)(*args, **kwargs)
        except MilvusException as exc:
            collection = args[0] if args and isinstance(args[0], str) else None
            if _not_loaded(exc) and collection in self._names:
                return self._load_and_retry(client, collection, method, *args, **kwargs)
            self._reset()
            raise StoreUnavailable(f"Milvus {method}: {exc.message}") from exc
        except Exception as exc:  # grpc errors surface as many exception types
            self._reset()
            raise StoreUnavailable(f"Milvus {method}: {exc}") from exc

    def _load_and_retry(
        self, client: MilvusClient, collection: str, method: str, *args: Any, **kwargs: Any
    ) -> Any:
        """A restarted server serves its collections released until someone loads them (Milvus
        Lite can even lose a load when two first requests race to open one collection), so a
        read that finds its collection released loads it and is tried once more, in whichever
        process hit it: the gateway's monitor is not the only reader (the profile workers)."""
        log.warning("Milvus collection %s is not loaded (restarted?): loading it", collection)
        try:
            client.load_collection(collection, timeout=kwargs.get("timeout"))
            return getattr(client, method)(*args, **kwargs)
        except Exception as exc:  # pymilvus raises several types
            self._reset()
            message = exc.message if isinstance(exc, MilvusException) else str(exc)
            raise StoreUnavailable(f"Milvus {method} (after a load): {message}") from exc

    def _reset(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def close(self) -> None:
        self._reset()

    def ping(self, timeout: float = 1.0) -> bool:
        """True when every collection exists and is loaded."""
        try:
            if not self._schema_checked:
                self.check_schema(timeout)
            for spec in self.specs:
                state = self._call("get_load_state", spec.name, timeout=timeout)
                if "Loaded" not in str(state.get("state")):
                    return False
            return True
        except StoreUnavailable:
            return False

    def ensure_collections(self, timeout: float = 30.0) -> None:
        """Create missing collections with their index, and load both (search needs it)."""
        client = self._connect()
        for spec in self.specs:
            if not self._call("has_collection", spec.name, timeout=timeout):
                log.info("creating Milvus collection %s", spec.name)
                self._call(
                    "create_collection",
                    spec.name,
                    schema=spec.schema,
                    index_params=index_params(client, self.settings),
                    consistency_level=CONSISTENCY,
                    timeout=timeout,
                )
            self._call("load_collection", spec.name, timeout=timeout)
        self.check_schema(timeout)

    def check_schema(self, timeout: float = 30.0) -> None:
        """Fail loudly when an existing collection lacks a field of this schema (created by an
        older version): writes would fail field by field instead, far from the cause."""
        for spec in self.specs:
            if not self._call("has_collection", spec.name, timeout=timeout):
                continue
            described = self._call("describe_collection", spec.name, timeout=timeout)
            have = {f["name"] for f in described.get("fields", [])}
            missing = sorted(f.name for f in spec.schema.fields if f.name not in have)
            if missing:
                raise StoreSchemaError(
                    f"Milvus collection {spec.name!r} lacks fields {missing}: it was created by "
                    "an older version; index into a fresh collection (or drop it and re-index)"
                )
        self._schema_checked = True

    def flush(self, timeout: float = 300.0) -> None:
        """Seal what was written to every collection and wait until the vector index covers
        it and the query node serves the indexed segments: bulk indexing ends with this.

        A Milvus server searches rows still in growing segments through a coarse interim
        index, not HNSW (measured on the 2.3 engine, random 384-d vectors, ef 128: recall@10
        0.31 before the sealed segment was served, 0.78 after). Milvus Lite only flushes.
        """
        deadline = time.monotonic() + timeout
        lite = self._is_lite(timeout)
        # Every collection sealed first, then waited for together: the query node takes up
        # the indexed segments of all of them at once (on the 2.3 engine ~19 s each, 60 s for
        # the three one after another).
        for spec in self.specs:
            self._call("flush", spec.name, timeout=timeout)
        # Every row written before the flush, counted at Strong, must be indexed and served
        # sealed, not only the index's own total: a wait on that total alone once returned
        # and the recall test's searches right after found 0.38 of the exact top 10 at ef
        # 512, where they find 0.99 (2026-12-07, engine 2.3.5; seen once in several runs).
        written = {spec.name: self.count(spec.name, "Strong") for spec in self.specs}
        pending = [spec.name for spec in self.specs]
        while True:
            pending = [
                name
                for name in pending
                if not self._served_indexed(name, written[name], lite, deadline)
            ]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise StoreUnavailable(f"Milvus {pending[0]}: not indexed after {timeout:.0f}s")
            time.sleep(0.5)

    def _served_indexed(self, name: str, written: int, lite: bool, deadline: float) -> bool:
        """Whether the vector index covers every row of ``name`` (at least ``written``) and
        (on a server) the query node serves those rows from sealed, indexed segments."""
        left = max(deadline - time.monotonic(), 0.1)
        info = self._call("describe_index", name, "vector", timeout=left)
        indexed = int(info.get("indexed_rows", 0))
        total = max(int(info.get("total_rows", 0)), written)
        if info.get("pending_index_rows") or indexed < total:
            return False
        if lite:
            return True
        loaded = self._call("list_loaded_segments", name, timeout=left)
        return sum(s.num_rows for s in loaded if "Sealed" in str(s.state)) >= total

    def _is_lite(self, timeout: float) -> bool:
        """Milvus Lite: one process, every read sees every write, whatever its level."""
        return self._server_version(timeout).startswith("milvus_lite")

    def _server_version(self, timeout: float) -> str:
        if self._version is None:
            self._version = str(self._call("get_server_version", timeout=timeout))
        return self._version

    def _spec(self, collection: str) -> CollectionSpec:
        """The spec of one of this store's collections, by name."""
        for spec in self.specs:
            if spec.name == collection:
                return spec
        raise ValueError(f"{collection!r} is not one of this store's collections")

    def _by_keys(
        self, spec: CollectionSpec, keys: Sequence[str], fields: Sequence[str], **opts: Any
    ) -> list[Any]:
        """The rows of ``spec``'s collection whose primary key is one of ``keys`` (``fields``
        only, in the server's order); ``opts``: the query's consistency level and timeout."""
        return self._call(
            "query",
            spec.name,
            filter=f"{spec.primary_key} in {literal(list(keys))}",
            output_fields=list(fields),
            **opts,
        )

    def drop_collections(self) -> None:
        for spec in self.specs:
            if self._call("has_collection", spec.name):
                self._call("drop_collection", spec.name)

    # --- items ---------------------------------------------------------------------------
    def upsert_items(self, rows: Sequence[ItemRow], timeout: float = 30.0) -> int:
        if not rows:
            return 0
        try:
            result = self._call("upsert", self.items.name, list(rows), timeout=timeout)
        finally:  # even a failed upsert may have landed
            self.item_cache.invalidate(r["item_id"] for r in rows)
        return int(result["upsert_count"])

    @timed
    def get_items(
        self,
        item_ids: Iterable[str],
        timeout: float,
        with_vectors: bool = False,
        with_neighbours: bool = False,
        consistency: str | None = None,
    ) -> dict[str, Row]:
        """Items by id at the item read level, or ``consistency`` (Strong before rewriting
        the rows read: an upsert must not carry stale behaviour signals over). At the item
        read level the rows come from the item cache, and only the ids it lacks from Milvus
        (with every field, so the next caller finds what it needs)."""
        ids = list(dict.fromkeys(item_ids))
        if not ids:
            return {}
        if consistency is None and self.item_cache.enabled:
            return self._cached_items(ids, timeout, with_vectors, with_neighbours)
        fields = ITEM_FIELDS + (["vector"] if with_vectors else [])
        fields += ["co_items"] if with_neighbours else []
        level = consistency or self.settings.milvus_item_consistency
        rows = self._by_keys(self.items, ids, fields, consistency_level=level, timeout=timeout)
        return {r["item_id"]: _plain(r) for r in rows}

    def _cached_items(
        self, ids: list[str], timeout: float, with_vectors: bool, with_neighbours: bool
    ) -> dict[str, Row]:
        found, missing = self.item_cache.get(ids)
        if missing:
            epoch = self.item_cache.epoch()
            rows = self._by_keys(
                self.items,
                missing,
                CACHED_ITEM_FIELDS,
                consistency_level=self.settings.milvus_item_consistency,
                timeout=timeout,
            )
            read = {r["item_id"]: _plain(r) for r in rows}
            self.item_cache.put({i: read.get(i) for i in missing}, epoch)  # absent ids too
            found.update(read)
        # The cached dicts themselves, read-only for every caller, when all their fields are
        # asked for; else shallow copies without the fields not asked for (_trimmed).
        drop = _unasked(with_vectors, with_neighbours)
        if not drop:
            return {i: found[i] for i in ids if i in found}
        return {i: _trimmed(found[i], drop) for i in ids if i in found}

    @timed
    def search_items(
        self,
        vector: np.ndarray,
        limit: int,
        timeout: float,
        categories: Sequence[str] = (),
        exclude_ids: Sequence[str] = (),
        with_vectors: bool = False,
    ) -> list[Row]:
        """Nearest items by inner product, with category and exclusion filters. With the item
        cache on, the search returns ids only and the rows come from :meth:`get_items`."""
        clauses = []
        if categories:
            clauses.append(f"ARRAY_CONTAINS_ANY(categories, {literal(list(categories))})")
        if exclude_ids:
            clauses.append(f"item_id not in {literal(list(exclude_ids))}")
        params = dict(self.settings.search_params)
        if "ef" in params:  # HNSW: a Milvus server refuses ef < limit (Milvus Lite does not)
            params["ef"] = max(int(params["ef"]), limit)
        cached = self.item_cache.enabled
        # cached: the primary keys and distances alone (``ids`` / ``distances`` of the result,
        # read without materialising a Hit per row, which pymilvus does on indexing)
        fields = [] if cached else ITEM_FIELDS + (["vector"] if with_vectors else [])
        start = time.monotonic()
        hits = self._call(
            "search",
            self.items.name,
            data=[np.asarray(vector, dtype=np.float32).tolist()],
            limit=limit,
            filter=" and ".join(clauses),
            output_fields=fields,
            search_params={"metric_type": "IP", "params": params},
            consistency_level=self.settings.milvus_item_consistency,
            timeout=timeout,
        )
        if not cached:
            return [{**_plain(h["entity"]), "score": float(h["distance"])} for h in hits[0]]
        ids, scores = [str(i) for i in hits[0].ids], hits[0].distances
        left = max(timeout - (time.monotonic() - start), 0.001)
        rows = self.get_items(ids, left, with_vectors=True, with_neighbours=True)  # shared
        drop = _unasked(with_vectors, with_neighbours=False)
        return [
            _trimmed(rows[item], drop, score=float(score))
            for item, score in zip(ids, scores, strict=True)
            if item in rows
        ]

    def list_items(self, after: str, limit: int, timeout: float) -> list[Row]:
        """Up to ``limit`` items whose id sorts after ``after``, in id order (a page)."""
        return self._first_by_id(f"item_id > {literal(after)}", ITEM_FIELDS, limit, timeout)

    def least_popular_items(
        self, fields: Sequence[str], limit: int, below: float, timeout: float
    ) -> list[Row]:
        """The first ``limit`` items in id order whose popularity is below ``below``: where
        fewer than a top's size have any popularity, the rest of that top (ties by id)."""
        return self._first_by_id(f"popularity < {below:.6f}", fields, limit, timeout)

    def _first_by_id(
        self, where: str, fields: Sequence[str], limit: int, timeout: float
    ) -> list[Row]:
        """The first ``limit`` items that match ``where`` in id order, at the item read level.

        A plain query with a limit returns any ``limit`` matches, not the first ones. So the
        ids of the matches are read (ids only), and the first ``limit`` of them by id read in
        full. Where more match than one query returns (:data:`QUERY_LIMIT`), the first
        ``limit`` by id all sort at or below the ``limit``-th smallest id of those returned,
        so the filter is narrowed to that and read again: each round keeps about
        ``limit / QUERY_LIMIT`` of the matches (two rounds up to some 2.7 million at a page
        of 100). Only after :data:`NARROWING_ROUNDS` does it take a query iterator's first
        page, which reads in primary-key order but waits on the engine at its setup and its
        page (a page of 100 of 2,000 items: 0.33-0.80 s on engine 2.3.5, the queries 5-15
        ms)."""
        if limit <= 0:
            return []
        level = self.settings.milvus_item_consistency
        narrowed = where
        for _ in range(NARROWING_ROUNDS):
            ids = self._call(
                "query",
                self.items.name,
                filter=narrowed,
                output_fields=["item_id"],
                consistency_level=level,
                limit=QUERY_LIMIT,
                timeout=timeout,
            )
            first = sorted(r["item_id"] for r in ids)[:limit]
            if len(ids) < QUERY_LIMIT:
                opts = {"consistency_level": level, "timeout": timeout}
                rows = self._by_keys(self.items, first, fields, **opts) if first else []
                return sorted((_plain(r) for r in rows), key=lambda r: r["item_id"])
            narrowed = f"({where}) and item_id <= {literal(first[-1])}"
        return self._first_page_by_id(where, fields, limit, timeout)

    def _first_page_by_id(
        self, where: str, fields: Sequence[str], limit: int, timeout: float
    ) -> list[Row]:
        """The first page of a query iterator, which reads in primary-key order."""
        iterator = self._call(
            "query_iterator",
            self.items.name,
            batch_size=limit,
            limit=limit,
            filter=where,
            output_fields=list(fields),
            timeout=timeout,
        )
        try:
            page = iterator.next()
        except Exception as exc:  # pymilvus raises several types
            raise StoreUnavailable(f"Milvus query_iterator: {exc}") from exc
        finally:
            iterator.close()
        return sorted((_plain(r) for r in page), key=lambda r: r["item_id"])

    def delete_item(self, item_id: str, timeout: float) -> bool:
        """Delete an item's row (and its cached copy); True when it existed. A Strong read
        after the delete, as in :meth:`delete_user`, makes the next read miss it."""
        expr = f"item_id == {literal(item_id)}"
        strong = {"output_fields": ["item_id"], "consistency_level": "Strong", "timeout": timeout}
        try:
            existed = bool(self._call("query", self.items.name, filter=expr, **strong))
            self._call("delete", self.items.name, filter=expr, timeout=timeout)
            left = self._call("query", self.items.name, filter=expr, **strong)
        finally:
            self.item_cache.invalidate([item_id])
        if left:
            raise StoreUnavailable("Milvus delete: the item's row is still there")
        return existed

    def all_items(
        self,
        fields: Sequence[str] = tuple(ITEM_FIELDS),
        fill_cache: bool = False,
        fits: bool | None = None,
    ) -> list[Row]:
        """Every item (for popularity caches and offline jobs).

        With ``fill_cache``, when the whole catalogue fits in the item cache, the scan reads
        every field and keeps each row in the cache as well (callers still get ``fields``):
        the gateway's periodic popularity scan then leaves no item to be read on demand, so
        a user's first ``Recommend`` after a start, or after the rows' TTL, does not pay for
        its items one request at a time (measured on the engine: 3.2-3.4 ms of items read by
        id per first visit). ``fits``: :meth:`item_cache_holds_catalogue`'s answer where the
        caller has just had it (it costs a count); should the catalogue have outgrown the
        cache since, the rows read are not kept (they would evict what the cache holds)."""
        cache = self.item_cache
        if fill_cache and fits is None:
            fits = self.item_cache_holds_catalogue()
        if not fill_cache or not fits:
            return self.scan(self.items.name, fields)
        epoch = cache.epoch()  # at the item read level: this process's upserts are seen
        level = self.settings.milvus_item_consistency
        rows = self.scan(self.items.name, CACHED_ITEM_FIELDS, consistency=level)
        if len(rows) <= cache.size:
            cache.put({r["item_id"]: r for r in rows}, epoch)
        drop = [f for f in CACHED_ITEM_FIELDS if f not in fields]
        return [_trimmed(r, drop) for r in rows]

    def item_cache_holds_catalogue(self) -> bool:
        """Whether the item cache can hold every item (then a scan may fill it)."""
        cache = self.item_cache
        if not cache.enabled:
            return False
        return self.count(self.items.name, self.settings.milvus_item_consistency) <= cache.size

    def items_where(
        self,
        fields: Sequence[str],
        *,
        min_popularity: float | None = None,
        min_created_at: int | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[Row]:
        """The items that meet every condition given (popularity at least, created at
        least, among ``ids``) at the item read level: Milvus evaluates the filter, so a read
        of the few above a popularity costs those few, not the catalogue. A :meth:`scan` with
        that filter: one query where fewer match than it returns (10-25 ms for 5,000 of
        20,000 rows on the engine, where a query iterator's setup alone takes 0.9-1.3 s
        against engine 2.3.5), the iterator's pages only beyond."""
        if ids is not None and not ids:
            return []
        where = _item_filter(min_popularity, min_created_at, ids)
        level = self.settings.milvus_item_consistency
        return self.scan(self.items.name, fields, consistency=level, where=where)

    def count_items(
        self, *, min_popularity: float | None = None, min_created_at: int | None = None
    ) -> int:
        """How many items :meth:`items_where` would return for these conditions, counted by
        Milvus at the item read level without reading them: what a search for a popularity
        floor or the newest item costs per step (no rows cross the wire)."""
        where = _item_filter(min_popularity, min_created_at, None)
        return self.count(self.items.name, self.settings.milvus_item_consistency, where)

    def scan(
        self,
        collection: str,
        fields: Sequence[str],
        batch: int | None = None,
        consistency: str | None = None,
        where: str = "",
    ) -> list[Row]:
        """Every row of a collection (that matches the filter ``where``), read in pages
        (offline jobs, caches), at the collection's consistency level or ``consistency``.

        Where fewer match than one query returns (:data:`QUERY_LIMIT`), by plain queries: the
        rows themselves where one page may hold them all, else the matching primary keys
        (keys only), then their rows by key, ``batch`` at a time. Else by the engine's query
        iterator, whose every page costs about 0.3 s whatever its size and level (pymilvus
        sends its pages at the collection's own level, Strong, so each waits for a time
        tick). Pages are as large as a query may return, except where rows carry a vector
        (:data:`VECTOR_SCAN_BATCH`, for the memory a page of Python floats takes). Measured on
        engine 2.3.5 at 9,742 items: every row whole at Session 0.78-0.93 s against the
        iterator's 1.58-2.18 s; ids and creation times at Strong 0.25-0.32 s against 0.80 s."""
        if batch is None:
            batch = VECTOR_SCAN_BATCH if "vector" in fields else QUERY_LIMIT
        level = {"consistency_level": consistency} if consistency else {}
        spec = self._spec(collection)
        whole = batch >= QUERY_LIMIT
        first = self._call(
            "query",
            collection,
            filter=where,
            output_fields=list(fields) if whole else [spec.primary_key],
            limit=QUERY_LIMIT,
            **level,
        )
        if len(first) < QUERY_LIMIT:
            if whole:
                return [_plain(r) for r in first]
            keys = [r[spec.primary_key] for r in first]
            rows: list[Row] = []
            for start in range(0, len(keys), batch):
                rows += self._by_keys(spec, keys[start : start + batch], fields, **level)
            return [_plain(r) for r in rows]
        iterator = self._call(
            "query_iterator",
            collection,
            batch_size=batch,
            filter=where,
            output_fields=list(fields),
            **level,
        )
        paged: list[Row] = []
        try:
            while page := iterator.next():
                paged.extend(_plain(r) for r in page)
        finally:
            iterator.close()
        return paged

    def count(self, collection: str, consistency: str | None = None, where: str = "") -> int:
        """The collection's rows (that match the filter ``where``), counted by Milvus."""
        level = {"consistency_level": consistency} if consistency else {}
        rows = self._call("query", collection, filter=where, output_fields=["count(*)"], **level)
        return int(rows[0]["count(*)"])

    # --- users ---------------------------------------------------------------------------
    def upsert_users(self, rows: Sequence[UserRow], timeout: float = 30.0) -> int:
        if not rows:
            return 0
        try:
            result = self._call("upsert", self.users.name, _json_encoded(rows), timeout=timeout)
        finally:  # even a failed upsert may have landed
            self.user_cache.invalidate(r["user_id"] for r in rows)
        return int(result["upsert_count"])

    @timed
    def get_user(
        self,
        user_id: str,
        timeout: float,
        with_vector: bool = True,
        cached: bool = False,
    ) -> Row | None:
        """The user's row at the user read level. ``cached``: from the profile cache when it
        holds the user, which also remembers users without a row; the gateway reads so and
        folds in the event log's events past the row's ``version``
        (:meth:`services.gateway.state.GatewayState.profile`), so a cached or lagging row is
        made current by the log. The vector is never cached (the re-encode lane rewrites it
        at the same version); an indexing job's or a segment refit's rewrite reaches the
        cache within its TTL, this process's writes and deletes at once."""
        fields = USER_FIELDS + (["vector"] if with_vector else [])
        cache = self.user_cache if cached and not with_vector else None
        if cache is not None:
            found, missing = cache.get([user_id])
            if user_id in found:
                return found[user_id]
            if user_id not in missing:
                return None  # known to have no row (the log's events make its profile)
            epoch = cache.epoch()
        level = self.settings.milvus_user_consistency
        row = self._get_one(self.users, user_id, fields, timeout, level)
        if cache is not None:
            cache.put({user_id: row}, epoch)
        return row

    def user_in_cache(self, user_id: str, with_vector: bool) -> bool:
        """Whether a ``cached`` :meth:`get_user` would answer from the profile cache now,
        without reading Milvus (the vector is never cached)."""
        return not with_vector and self.user_cache.holds(user_id)

    @timed
    def get_users(
        self, user_ids: Sequence[str], timeout: float, with_vector: bool = True
    ) -> dict[str, Row]:
        """Many users' rows by id in one query at the user read level (absent: no row); the
        profile worker reads a whole batch this way (a query per user was ~40% of its time).
        Never from the profile cache: this is the read before a rewrite."""
        ids = list(dict.fromkeys(user_ids))
        if not ids:
            return {}
        rows = self._by_keys(
            self.users,
            ids,
            USER_FIELDS + (["vector"] if with_vector else []),
            consistency_level=self.settings.milvus_user_consistency,
            timeout=timeout,
        )
        return {str(r["user_id"]): _plain(r) for r in rows}

    def delete_user(self, user_id: str, timeout: float) -> bool:
        """Delete the user's row; the next read of this process no longer finds it.

        Milvus 2.3 answers a delete without its timestamp, so a Session read would not wait
        for it: one Strong read after the delete (a time tick, ~200 ms on a server) makes the
        query node apply it before DeleteUser answers.
        """
        existed = self.get_user(user_id, timeout, with_vector=False) is not None
        try:
            self._call(
                "delete",
                self.users.name,
                filter=f"user_id == {literal(user_id)}",
                timeout=timeout,
            )
        finally:
            self.user_cache.invalidate([user_id])
        if self._get_one(self.users, user_id, ["user_id"], timeout, "Strong") is not None:
            raise StoreUnavailable("Milvus delete: the user's row is still there")
        return existed

    # --- segments ------------------------------------------------------------------------
    def replace_segments(self, rows: Sequence[SegmentRow], timeout: float = 30.0) -> int:
        """Swap in a new segmentation: upsert the new centroids, delete stale segment ids."""
        ids = [r["segment_id"] for r in rows]
        self._call("upsert", self.segments.name, list(rows), timeout=timeout)
        stale = f"segment_id not in {literal(ids)}" if ids else ""
        self._call(
            "delete", self.segments.name, filter=stale or 'segment_id != ""', timeout=timeout
        )
        return len(rows)

    def set_user_segments(self, segments: Mapping[str, str], timeout: float = 30.0) -> int:
        """Write only the ``segment`` field of the users that still exist (partial update).

        The segment refit runs beside the live gateway: a whole-row upsert from its earlier
        scan would undo profile updates ingested meanwhile and bring back users deleted
        meanwhile. A user deleted between the check and the write fails the batch.

        Servers before Milvus 2.6.2 (the local 2.3 engine) have no partial upsert: there the
        rows are read afresh (Strong) and written whole with the new segment, so only a
        profile update landing between that read and the write is lost (the user's next
        event rewrites the row).
        """
        ids = list(segments)
        if not ids:
            return 0
        partial = self._supports_partial_update(timeout)
        fields = ["user_id"] if partial else [*USER_FIELDS, "vector"]
        existing = self._by_keys(self.users, ids, fields, timeout=timeout)
        if partial:
            rows = [{"user_id": r["user_id"], "segment": segments[r["user_id"]]} for r in existing]
        else:
            rows = [{**_plain(r), "segment": segments[r["user_id"]]} for r in existing]
            for row in rows:
                row["vector"] = row["vector"].tolist()
        if not rows:
            return 0
        extra = {"partial_update": True} if partial else {}
        try:
            result = self._call("upsert", self.users.name, rows, timeout=timeout, **extra)
        finally:
            self.user_cache.invalidate(r["user_id"] for r in rows)
        return int(result["upsert_count"])

    def _supports_partial_update(self, timeout: float) -> bool:
        """Milvus Lite and Milvus >= 2.6.2 take ``partial_update``; earlier servers do not."""
        match = re.match(r"v?(\d+)\.(\d+)\.(\d+)", self._server_version(timeout))
        return not match or tuple(map(int, match.groups())) >= (2, 6, 2)

    @timed
    def nearest_segments(self, vectors: np.ndarray, timeout: float) -> list[Row | None]:
        """The segment whose centroid is closest to each vector (online assignment), in one
        search for all (None: no segments yet)."""
        hits = self._call(
            "search",
            self.segments.name,
            data=np.asarray(vectors, dtype=np.float32).reshape(len(vectors), -1).tolist(),
            limit=1,
            output_fields=SEGMENT_FIELDS,
            consistency_level=self.settings.milvus_item_consistency,
            timeout=timeout,
        )
        return [_plain(h[0]["entity"]) if h else None for h in hits]

    def nearest_segment(self, vector: np.ndarray, timeout: float) -> Row | None:
        """The segment whose centroid is closest to ``vector``."""
        return self.nearest_segments(np.asarray([vector]), timeout)[0]

    @timed
    def get_segment(self, segment_id: str, timeout: float) -> Row | None:
        level = self.settings.milvus_item_consistency
        return self._get_one(self.segments, segment_id, SEGMENT_FIELDS, timeout, level)

    def _get_one(
        self,
        spec: CollectionSpec,
        key: str,
        fields: Sequence[str],
        timeout: float,
        consistency: str,
    ) -> Row | None:
        """One row by primary key, or None."""
        rows = self._call(
            "query",
            spec.name,
            filter=f"{spec.primary_key} == {literal(key)}",
            output_fields=list(fields),
            consistency_level=consistency,
            timeout=timeout,
        )
        return _plain(rows[0]) if rows else None


def _not_loaded(exc: MilvusException) -> bool:
    return exc.code == NOT_LOADED or "not loaded" in str(exc.message).lower()


def _item_filter(
    min_popularity: float | None, min_created_at: int | None, ids: Sequence[str] | None
) -> str:
    """The Milvus filter of :meth:`VectorStore.items_where`'s conditions ("" for none)."""
    clauses = []
    if min_popularity is not None:
        clauses.append(f"popularity >= {min_popularity:.6f}")
    if min_created_at is not None:
        clauses.append(f"created_at >= {int(min_created_at)}")
    if ids is not None:
        clauses.append(f"item_id in {literal(list(ids))}")
    return " and ".join(clauses)


def literal(value: str | list[str]) -> str:
    """A Milvus string (or string-list) literal: JSON escaping is Milvus's escaping."""
    return json.dumps(value, ensure_ascii=False)


def _json_encoded(rows: Sequence[UserRow]) -> list[dict[str, Any]]:
    """User rows with their JSON fields as JSON text: pymilvus walks a dict or list value
    in Python to convert numpy scalars (a tenth of a profile worker's time), while a string
    it only validates, in C. The caller's rows are left as they are."""
    out: list[dict[str, Any]] = []
    for row in rows:
        text: dict[str, Any] = dict(row)
        for key in USER_JSON_FIELDS:
            if key in text:
                text[key] = json.dumps(text[key], separators=(",", ":"), default=_numpy_value)
        out.append(text)
    return out


def _unasked(with_vectors: bool, with_neighbours: bool) -> list[str]:
    """The item fields a read did not ask for (the item cache keeps every field)."""
    return [*([] if with_vectors else ["vector"]), *([] if with_neighbours else ["co_items"])]


def _trimmed(row: Row, drop: Sequence[str], **extra: Any) -> Row:
    """A shallow copy of a cached row without ``drop``, with ``extra``: a Recommend reads some
    300 rows, and rebuilding each field by field in Python was a tenth of its CPU."""
    out = {**row, **extra}
    for key in drop:
        out.pop(key, None)
    return out


def _numpy_value(value: Any) -> Any:
    """A numpy scalar or array in a JSON field, as pymilvus itself would convert it."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _plain(row: Any) -> Row:
    """Milvus rows as plain dicts with plain Python values (ARRAY fields come as protos)."""
    out = dict(row)
    for key in ("categories", "recent_items", "seen_items", "co_items", "popular_items"):
        if key in out and out[key] is not None:
            out[key] = list(map(str, out[key]))
    if "vector" in out:
        out["vector"] = np.asarray(out["vector"], dtype=np.float32)
    return out
