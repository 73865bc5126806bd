"""The gateway's popularity refresh at a catalogue larger than its item cache.

``python -m bench.popularity``: every ``RECSYS_POPULAR_REFRESH_S`` each gateway process reads
the catalogue's popularity for its cold-start list and the ranker's clock. Side by side, on
one collection of the real Milvus engine:

* **every row (the baseline)**: the refresh before 2026-12-06 (thirty-fourth session): every
  item's row, titles and texts included, read (in pages of 4,096, as then) and sorted in
  the gateway, and all of it kept (for items the online scores might lift);
* **every item's popularity, then the top's rows**: the first refresh before 2026-12-07
  (fortieth session), and every refresh where the catalogue fits the item cache: three small
  fields of every item (:data:`services.recommend.retrieve.POPULARITY_FIELDS`), the top's
  rows by id; read in the query iterator's pages of 4,096 rows as before that session, and
  of 16,384 (:meth:`VectorStore.scan` since);
* **first: above a counted floor (ours)**: :meth:`PopularItems.refresh` the first time at a
  catalogue larger than the item cache: a popularity floor and the newest item's time found
  by Milvus counts, then the same fields of the items above that floor and of the newest
  ones, the top's rows by id;
* **later: above the last top's floor (ours)**: every later refresh there: the same fields
  of the items above half the last top's least popularity and of the items created since
  the last refresh, the top's rows by id.

The items are synthetic (random unit vectors, a text of ``--text-chars`` characters, random
popularity, on ``--popular`` of them only if given: then the top reaches items without any),
written once and flushed. The refreshes alternate for ``--rounds`` rounds;
each is timed (wall and the process's CPU seconds), then run once more under ``tracemalloc``
for the Python memory it allocates at its peak and keeps afterwards. A table is printed and
written with the raw figures (``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.util import engine_settings, fmt, load_average, publish, table
from core.config import Settings
from core.milvus_schema import ITEM_FIELDS
from core.paths import REPO_ROOT
from core.rows import item_row
from services.recommend.retrieve import POPULARITY_FIELDS, ROWS_TIMEOUT_S, PopularItems
from services.vectors.store import Row, VectorStore

BASELINE = "every row (the refresh before)"
SCAN_4096 = "every item's popularity in pages of 4,096"
SCAN = "every item's popularity in pages of 16,384"
FIRST = "first: above a counted floor"
OURS = "later: above the last top's floor"


def fill(
    store: VectorStore,
    items: int,
    text_chars: int,
    popular: int | None = None,
    seed: int = 0,
    shuffled: bool = False,
) -> float:
    """Write ``items`` synthetic rows and flush them (any popularity on ``popular`` of them,
    spread evenly; on every one by default); the seconds it took. ``shuffled``: the ids are
    written in a random order, not in id order (segments then hold ids from the whole
    range, as where ids are not given out in creation order)."""
    every = max(items // popular, 1) if popular else 1
    rng = np.random.default_rng(seed)
    number = rng.permutation(items) if shuffled else np.arange(items)
    dim = store.settings.embedding_dim
    words = ["a", "film", "about", "the", "quick", "brown", "fox", "and", "its", "lazy", "dog"]
    t0 = time.perf_counter()
    for start in range(0, items, 1000):
        n = min(1000, items - start)
        vectors = rng.normal(size=(n, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        rows = []
        for k in range(n):
            text = " ".join(rng.choice(words, size=text_chars // 4))[:text_chars]
            rows.append(
                item_row(
                    f"item-{number[start + k]:07d}",
                    f"Title {number[start + k]}",
                    ["Drama", "Comedy"][: 1 + k % 2],
                    text,
                    popularity=float(rng.pareto(1.2)) if (start + k) % every == 0 else 0.0,
                    created_at=1_600_000_000 + start + k,
                    vector=vectors[k],
                )
            )
        store.upsert_items(rows)
    store.flush()
    return time.perf_counter() - t0


def every_row(store: VectorStore, size: int) -> tuple[list[Row], list[Row]]:
    """The refresh before: every row read (in pages of 4,096, as then) and sorted; the
    catalogue and its top kept."""
    rows = store.scan(store.items.name, ITEM_FIELDS, batch=4096)
    rows.sort(key=lambda r: (-float(r["popularity"]), r["item_id"]))
    return rows, rows[:size]


def every_popularity(store: VectorStore, size: int, batch: int | None = None) -> list[str]:
    """The first refresh before: every item's popularity read (in pages of ``batch``, the
    store's own by default), the top's rows by id."""
    light = store.scan(store.items.name, POPULARITY_FIELDS, batch=batch)
    light.sort(key=lambda r: (-float(r["popularity"]), r["item_id"]))
    top = [r["item_id"] for r in light[:size]]
    rows = store.get_items(top, ROWS_TIMEOUT_S)
    return [i for i in top if i in rows]


def popularity_first(store: VectorStore, size: int) -> PopularItems:
    cache = PopularItems(size)
    if not cache.refresh(store):
        raise RuntimeError("the popularity refresh failed")
    return cache


def refreshed_again(cache: PopularItems, store: VectorStore) -> PopularItems:
    """A later refresh of a cache that has refreshed before (a running gateway's)."""
    if not cache.refresh(store):
        raise RuntimeError("the popularity refresh failed")
    if cache._complete:
        raise RuntimeError("the later refresh read every item: the catalogue fits the cache")
    return cache


def _counted(store: VectorStore) -> list[int]:
    """The store's item counts from now on, one entry each (the count itself)."""
    counts: list[int] = []
    count_items = store.count_items

    def counting(**conditions: Any) -> int:
        counts.append(n := count_items(**conditions))
        return n

    store.count_items = counting  # type: ignore[method-assign]
    return counts


def measure(fn: Callable[[], Any]) -> dict[str, float]:
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    kept = fn()
    out = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    del kept
    return out


def memory(fn: Callable[[], Any]) -> dict[str, float]:
    """Python memory (MB) the refresh allocates at its peak, and keeps while its result lives."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = fn()
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del kept
    return {"peak_mb": (peak - before) / 2**20, "kept_mb": (current - before) / 2**20}


def run(
    settings: Settings, items: int, text_chars: int, rounds: int, popular: int | None = None
) -> dict[str, Any]:
    size = settings.popular_cache_size
    store = VectorStore(settings)
    load_before = load_average()
    try:
        store.drop_collections()
        store.ensure_collections()
        fill_s = fill(store, items, text_chars, popular)
        counts = _counted(store)
        warm = popularity_first(store, size)
        first_counts, read_first = len(counts), len(warm._popularity)
        variants: dict[str, Callable[[], Any]] = {
            BASELINE: lambda: every_row(store, size),
            SCAN_4096: lambda: every_popularity(store, size, batch=4096),
            SCAN: lambda: every_popularity(store, size),
            FIRST: lambda: popularity_first(store, size),
            OURS: lambda: refreshed_again(warm, store),
        }
        everything, base_top = every_row(store, size)
        scanned = len(everything)  # engine 2.3's iterator misses rows still unsealed
        del everything
        top = {
            BASELINE: [r["item_id"] for r in base_top],
            SCAN_4096: every_popularity(store, size, batch=4096),
            SCAN: every_popularity(store, size),
            FIRST: [r["item_id"] for r in popularity_first(store, size).top(size)],
            OURS: [r["item_id"] for r in refreshed_again(warm, store).top(size)],
        }
        if not top[BASELINE] == top[SCAN_4096] == top[SCAN] == top[FIRST] == top[OURS]:
            raise RuntimeError("the refreshes disagree on the top items")
        read_above = len(warm._popularity)  # the items above the floor the later one read
        timings: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        for r in range(rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                timings[name].append(measure(variants[name]))
        memories = {name: memory(fn) for name, fn in variants.items()}
    finally:
        with contextlib.suppress(Exception):
            store.drop_collections()
        store.close()
    return {
        "items": items,
        "popular": popular or items,
        "scanned": scanned,
        "text_chars": text_chars,
        "item_cache_size": settings.milvus_item_cache_size,
        "popular_cache_size": size,
        "fill_s": fill_s,
        "rounds": rounds,
        "same_top_items": len(top[OURS]),  # compared in order; a difference fails the run
        "first_counts": first_counts,  # Milvus counts of the first refresh's searches
        "read_first": read_first,  # the items above the floor the first refresh read
        "read_above_floor": read_above,
        "timings": timings,
        "memory": memories,
        "load_average": [load_before, load_average()],
    }


def render(result: dict[str, Any]) -> str:
    base = result["timings"][BASELINE]
    rows = []
    for name, runs in result["timings"].items():
        wall = float(np.median([r["wall_s"] for r in runs]))
        cpu = float(np.median([r["cpu_s"] for r in runs]))
        mem = result["memory"][name]
        rows.append(
            [
                name,
                fmt(wall, 2),
                fmt(cpu, 2),
                fmt(float(np.median([r["wall_s"] for r in base])) / wall, 1) + "x",
                fmt(mem["peak_mb"], 1),
                fmt(mem["kept_mb"], 1),
            ]
        )
    head = (
        f"{result['scanned']:,} items scanned of {result['items']:,} written "
        f"({result.get('popular', result['items']):,} with any popularity; texts of "
        f"{result['text_chars']} characters; item cache "
        f"{result['item_cache_size']:,} rows), top {result['popular_cache_size']}, medians of "
        f"{result['rounds']} rounds; the same top {result['same_top_items']} items from "
        f"each; the first refresh made {result['first_counts']} counts and read "
        f"{result['read_first']:,} items above its floor, a later one "
        f"{result['read_above_floor']:,} above the last top's"
    )
    headers = ["refresh", "wall s", "gateway CPU s", "speed-up", "peak MB", "kept MB"]
    return head + "\n\n" + table(headers, rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.popularity", description=__doc__)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--text-chars", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--popular", type=int, default=None, help="items with any popularity (default: all)"
    )
    parser.add_argument(
        "--json", type=Path, default=REPO_ROOT / "reports" / "bench_popularity_refresh.json"
    )
    args = parser.parse_args(argv)
    with engine_settings("popularity-") as settings:
        result = run(settings, args.items, args.text_chars, args.rounds, args.popular)
    publish(result, render(result), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
