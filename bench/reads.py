"""The store's reads in id order and its scans of a few thousand rows: plain queries against
the query iterator.

``python -m bench.reads`` (``make bench-reads``): side by side, on one collection of the real
Milvus engine,

* **a page of ``ListItems``** (``--pages`` pages of ``--page`` items, from the start of the
  catalogue and from its middle): :meth:`VectorStore.list_items` (ours: the matching ids by
  one query, the filter narrowed below the ``page``-th smallest id while more match than one
  query returns, then the page's rows by id) against the first page of a query iterator
  (the read before 2026-12-07, forty-second session);
* **the first items in id order without any popularity** (the few-popular refresh's read of
  the rest of its top): :meth:`VectorStore.least_popular_items` against the same iterator;
* **a scan of the newest ``--scan-rows`` items** (fewer than one query returns): every row
  with its vector at the item read level (what fills the gateway's item cache) and the ids
  and creation times at Strong (``ops.indexing``): :meth:`VectorStore.scan` (ours: plain
  queries) against the query iterator's pages of the same size.

The items are :func:`bench.popularity.fill`'s, written with their ids in a random order (a
segment holds ids from the whole range), ``--popular`` of them with any popularity. Both
sides of each read must return the same ids in the same order (a difference fails the run);
the Milvus calls each makes are counted. The reads alternate for ``--rounds`` rounds; each
read's wall time is kept, and a table of medians is printed and written with the raw
figures (``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.popularity import fill
from bench.util import engine_settings, fmt, load_average, publish, table
from core.config import Settings
from core.milvus_schema import ITEM_FIELDS
from core.paths import REPO_ROOT
from services.recommend.retrieve import LEAST_POPULARITY, POPULARITY_FIELDS
from services.vectors.store import (
    CACHED_ITEM_FIELDS,
    QUERY_LIMIT,
    VECTOR_SCAN_BATCH,
    VectorStore,
    literal,
)

TIMEOUT_S = 30.0
PAGES_START = "ListItems page, from the start"
PAGES_MIDDLE = "ListItems page, from the middle"
LEAST_POPULAR = "first items without popularity"
SCAN_VECTORS = "newest items with vectors (Session)"
SCAN_IDS = "newest ids and creation times (Strong)"
OURS, ITERATOR = "ours", "iterator"


def iterator_page(store: VectorStore, where: str, fields: Sequence[str], limit: int) -> list[str]:
    """The read before: the first page of a query iterator (primary-key order)."""
    return [r["item_id"] for r in store._first_page_by_id(where, fields, limit, TIMEOUT_S)]


def iterator_scan(
    store: VectorStore, fields: Sequence[str], where: str, consistency: str
) -> list[str]:
    """The scan before: the query iterator's pages, as large as :meth:`VectorStore.scan`'s."""
    batch = VECTOR_SCAN_BATCH if "vector" in fields else QUERY_LIMIT
    iterator = store._call(
        "query_iterator",
        store.items.name,
        batch_size=batch,
        filter=where,
        output_fields=list(fields),
        consistency_level=consistency,
    )
    ids: list[str] = []
    try:
        while page := iterator.next():
            ids.extend(r["item_id"] for r in page)
    finally:
        iterator.close()
    return sorted(ids)


def pages(read: Callable[[str], list[str]], first_after: str, count: int) -> list[str]:
    """The ids of ``count`` consecutive pages, each after the last id of the one before."""
    out, after = [], first_after
    for _ in range(count):
        page = read(after)
        out += page
        after = page[-1]
    return out


def reads(
    store: VectorStore, settings: Settings, args: argparse.Namespace, middle: str, newest: int
) -> dict[str, dict[str, Callable[[], Any]]]:
    """Each read, ours and the iterator's, as calls returning the ids they read."""
    page, count, top = args.page, args.pages, settings.popular_cache_size
    level = settings.milvus_item_consistency
    newer = f"created_at >= {newest}"

    def ours_page(after: str) -> list[str]:
        return [r["item_id"] for r in store.list_items(after, page, TIMEOUT_S)]

    def iterator_list(after: str) -> list[str]:
        return iterator_page(store, f"item_id > {literal(after)}", ITEM_FIELDS, page)

    def ours_scan(fields: Sequence[str], consistency: str) -> list[str]:
        rows = store.scan(store.items.name, fields, consistency=consistency, where=newer)
        return sorted(r["item_id"] for r in rows)

    unpopular = f"popularity < {LEAST_POPULARITY:.6f}"
    light = POPULARITY_FIELDS
    return {
        PAGES_START: {
            OURS: lambda: pages(ours_page, "", count),
            ITERATOR: lambda: pages(iterator_list, "", count),
        },
        PAGES_MIDDLE: {
            OURS: lambda: pages(ours_page, middle, count),
            ITERATOR: lambda: pages(iterator_list, middle, count),
        },
        LEAST_POPULAR: {
            OURS: lambda: [
                r["item_id"]
                for r in store.least_popular_items(light, top, LEAST_POPULARITY, TIMEOUT_S)
            ],
            ITERATOR: lambda: iterator_page(store, unpopular, light, top),
        },
        SCAN_VECTORS: {
            OURS: lambda: ours_scan(CACHED_ITEM_FIELDS, level),
            ITERATOR: lambda: iterator_scan(store, CACHED_ITEM_FIELDS, newer, level),
        },
        SCAN_IDS: {
            OURS: lambda: ours_scan(("item_id", "created_at"), "Strong"),
            ITERATOR: lambda: iterator_scan(store, ("item_id", "created_at"), newer, "Strong"),
        },
    }


def _calls(store: VectorStore) -> Counter[str]:
    """The store's Milvus calls from now on, counted by method."""
    counts: Counter[str] = Counter()
    call = store._call

    def counting(method: str, *args: Any, **kwargs: Any) -> Any:
        counts[method] += 1
        return call(method, *args, **kwargs)

    store._call = counting  # type: ignore[method-assign]
    return counts


def run(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    store = VectorStore(settings)
    load_before = load_average()
    try:
        store.drop_collections()
        store.ensure_collections()
        fill_s = fill(store, args.items, args.text_chars, args.popular, shuffled=True)
        milvus = "Milvus Lite" if store._is_lite(TIMEOUT_S) else "the real Milvus engine"
        middle = f"item-{args.items // 2:07d}"
        newest = 1_600_000_000 + args.items - args.scan_rows  # fill's creation times
        variants = reads(store, settings, args, middle, newest)
        counts = _calls(store)
        checked: dict[str, dict[str, Any]] = {}
        for name, sides in variants.items():
            got = {}
            for side, read in sides.items():
                counts.clear()
                got[side] = read()
                checked.setdefault(name, {})[side] = dict(counts)
            if got[OURS] != got[ITERATOR] or not got[OURS]:
                raise RuntimeError(f"{name}: ours and the iterator read different items")
            checked[name]["items"] = len(got[OURS]) // _per(name, args.pages)
        timings: dict[str, dict[str, list[float]]] = {
            name: {OURS: [], ITERATOR: []} for name in variants
        }
        for r in range(args.rounds):
            for name, sides in variants.items():
                order = [OURS, ITERATOR] if r % 2 == 0 else [ITERATOR, OURS]
                for side in order:
                    t0 = time.perf_counter()
                    sides[side]()
                    timings[name][side].append(time.perf_counter() - t0)
    finally:
        with contextlib.suppress(Exception):
            store.drop_collections()
        store.close()
    return {
        "milvus": milvus,
        "items": args.items,
        "popular": args.popular,
        "dim": settings.embedding_dim,
        "text_chars": args.text_chars,
        "page": args.page,
        "pages": args.pages,
        "scan_rows": args.scan_rows,
        "top": settings.popular_cache_size,
        "fill_s": fill_s,
        "rounds": args.rounds,
        "calls": checked,  # per read: Milvus calls by method, and the items it returned
        "timings": timings,
        "load_average": [load_before, load_average()],
    }


def _per(name: str, pages: int) -> int:
    """How many reads one call of ``name`` makes (its pages, for the ListItems rows)."""
    return pages if name in (PAGES_START, PAGES_MIDDLE) else 1


def _per_read(result: dict[str, Any], name: str, side: str) -> float:
    """A read's median wall seconds (a page's, for the ListItems rows)."""
    return float(np.median(result["timings"][name][side])) / _per(name, result["pages"])


def _calls_text(calls: dict[str, int], per: int) -> str:
    return ", ".join(f"{n / per:g} {method}" for method, n in sorted(calls.items()))


def render(result: dict[str, Any]) -> str:
    rows = []
    for name in result["timings"]:
        ours, base = _per_read(result, name, OURS), _per_read(result, name, ITERATOR)
        calls = result["calls"][name]
        rows.append(
            [
                name,
                f"{calls['items']:,}",
                fmt(base * 1000, 1),
                fmt(ours * 1000, 1),
                fmt(base / ours, 1) + "x",
                _calls_text(calls[OURS], _per(name, result["pages"])),
            ]
        )
    head = (
        f"{result['items']:,} items ({result['popular']:,} with any popularity; "
        f"{result['dim']}-d vectors, texts of {result['text_chars']} characters; ids written "
        f"in a random order), {result['milvus']}; medians of {result['rounds']} rounds, "
        f"the ListItems rows per page of {result['page']} ({result['pages']} consecutive "
        f"pages a round); both sides read the same items in the same order"
    )
    headers = ["read", "items", "iterator ms", "ours ms", "speed-up", "our Milvus calls"]
    return head + "\n\n" + table(headers, rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reads", description=__doc__)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--popular", type=int, default=100)
    parser.add_argument("--dim", type=int, default=None, help="default: the settings' own")
    parser.add_argument("--text-chars", type=int, default=400)
    parser.add_argument("--page", type=int, default=100)
    parser.add_argument("--pages", type=int, default=5)
    parser.add_argument("--scan-rows", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "reports" / "bench_reads.json")
    args = parser.parse_args(argv)
    if not 0 < args.scan_rows < min(QUERY_LIMIT, args.items):
        parser.error(f"--scan-rows must be below {QUERY_LIMIT:,} (one query) and --items")
    with engine_settings("reads-") as settings:
        if args.dim:
            settings = settings.model_copy(update={"embedding_dim": args.dim})
        result = run(settings, args)
    publish(result, render(result), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
