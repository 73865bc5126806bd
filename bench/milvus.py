"""Milvus HNSW recall@10 against exact inner-product search, and its latency.

:func:`bench_milvus` (a section of ``make bench``): queries are user-tower vectors of indexed
users; the exact answer is NumPy over every item vector read back from Milvus. ``gateway``
queries also exclude the user's history with the same ``item_id not in [...]`` filter the
gateway's ANN source uses; ``bounded`` is the plain search at Bounded consistency instead of
the collections' Strong (what a Strong read costs).

:func:`recall_at_scale` (``python -m bench.milvus``): the real engine at >= 10,000 real
text-derived vectors (every MovieLens item text and every distinct MovieLens tag, encoded by
the pretrained MiniLM as the evaluation's content baseline encodes them), bulk-indexed,
flushed so that the searches run on sealed HNSW segments, then each ``ef`` against NumPy's
exact top ``k``. Queries are what the gateway's ANN asks with: the normalised mean of a few
random items' vectors (a user's recent history).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.util import engine_settings, load_average, quantiles
from core.config import Settings
from core.rows import item_row
from services.vectors.store import VectorStore, literal


def bench_milvus(
    settings: Settings,
    queries: int,
    efs: list[int],
    max_seconds: float,
    k: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    from pymilvus import MilvusClient

    load_before = load_average()
    store = VectorStore(settings)
    try:
        items = store.scan(store.items.name, ["item_id", "vector"])
        users = store.scan(store.users.name, ["user_id", "vector", "recent_items"])
    finally:
        store.close()
    ids = np.array([r["item_id"] for r in items])
    matrix = np.stack([np.asarray(r["vector"], dtype=np.float32) for r in items])
    rng = np.random.default_rng(seed)
    chosen = [users[i] for i in rng.permutation(len(users))[:queries]]
    client = MilvusClient(uri=settings.milvus_uri, token=settings.milvus_token.get_secret_value())
    default_ef = int(settings.search_params.get("ef", 0)) or None
    configs = [(ef, "plain") for ef in sorted({*efs, *([default_ef] if default_ef else [])})]
    if default_ef:
        configs.append((default_ef, "gateway"))
        configs.append((default_ef, "bounded"))  # same search, Bounded instead of Strong
    try:
        runs = _run(client, store.items.name, ids, matrix, chosen, configs, k, max_seconds)
    finally:
        client.close()
    return {
        "items": len(items),
        "queries": len(chosen),
        "index": {"type": settings.index_type, **settings.index_params},
        "default_ef": default_ef,
        "runs": runs,
        "load_average": [load_before, load_average()],
    }


def _run(
    client: Any,
    collection: str,
    ids: np.ndarray,
    matrix: np.ndarray,
    users: list[dict[str, Any]],
    configs: list[tuple[int, str]],
    k: int,
    max_seconds: float,
) -> list[dict[str, Any]]:
    """Every configuration for each query in turn (drift on a shared machine hits all alike),
    after a short warm-up; stops after ``max_seconds``."""
    index_of = {item_id: i for i, item_id in enumerate(ids)}
    latencies: dict[tuple[int, str], list[float]] = {c: [] for c in configs}
    recalls: dict[tuple[int, str], list[float]] = {c: [] for c in configs}
    start = time.perf_counter()
    for n, user in enumerate(users):
        vector = np.asarray(user["vector"], dtype=np.float32)
        for ef, mode in configs:
            exclude = list(user["recent_items"]) if mode == "gateway" else []
            scores = matrix @ vector
            if exclude:
                scores[[index_of[i] for i in exclude if i in index_of]] = -np.inf
            exact = set(ids[np.argsort(-scores)[:k]])
            extra = {"consistency_level": "Bounded"} if mode == "bounded" else {}
            t0 = time.perf_counter()
            hits = client.search(
                collection,
                data=[vector.tolist()],
                limit=k,
                filter=f"item_id not in {literal(exclude)}" if exclude else "",
                output_fields=["item_id"],
                search_params={"metric_type": "IP", "params": {"ef": ef}},
                **extra,
            )
            if n >= 3:  # the first queries warm the connection and the index up
                latencies[(ef, mode)].append(time.perf_counter() - t0)
            got = {h["entity"]["item_id"] for h in hits[0]}
            recalls[(ef, mode)].append(len(got & exact) / k)
        if time.perf_counter() - start >= max_seconds:
            break
    return [
        {
            "ef": ef,
            "mode": mode,
            "queries": len(recalls[(ef, mode)]),
            "recall_at_k": float(np.mean(recalls[(ef, mode)])),
            "min_recall": float(np.min(recalls[(ef, mode)])),
            "latency_ms": {q: v * 1000 for q, v in quantiles(latencies[(ef, mode)]).items()},
        }
        for ef, mode in configs
    ]


def catalogue_vectors(cache_dir: Path) -> tuple[list[str], np.ndarray, dict[str, int]]:
    """Ids and MiniLM unit vectors of every MovieLens item text (``m<movieId>``) and every
    distinct tag (``t<n>``, the padding past 10,000), and how many of each."""
    import pandas as pd

    from bench.stack import MOVIELENS
    from core.text import item_texts
    from training.data import load_dataset
    from training.models.text_encoder import TowerEncoder
    from training.pretrained import resolve_pretrained

    items = item_texts(load_dataset(MOVIELENS).items)
    tags = sorted(set(pd.read_csv(MOVIELENS / "tags.csv")["tag"].astype(str)))
    texts = [*items.values(), *tags]
    ids = [f"m{i}" for i in items] + [f"t{n}" for n in range(len(tags))]
    encoder = TowerEncoder(resolve_pretrained(""), cache_dir=cache_dir)
    vectors = encoder.encode(texts).astype(np.float32)
    return ids, vectors, {"item_texts": len(items), "tags": len(tags)}


def recall_at_scale(
    settings: Settings,
    ids: Sequence[str],
    vectors: np.ndarray,
    efs: Sequence[int],
    queries: int = 200,
    history: int = 5,
    k: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """Index ``vectors`` into a collection of its own, flush, and search each ``ef``.

    Every ``ef`` runs the same queries in turn (drift hits all alike); also the gateway's
    search shape (``2 x rank_candidates`` = 200 results, where the engine searches with
    ``ef = max(ef, limit)``) as recall@200 against the exact top 200."""
    from pymilvus import MilvusClient

    prefix = "recallbench"
    settings = settings.model_copy(
        update={
            "items_collection": f"{prefix}_items",
            "users_collection": f"{prefix}_users",
            "segments_collection": f"{prefix}_segments",
        }
    )
    store = VectorStore(settings)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(ids), size=(queries, history))
    probes = vectors[picks].mean(axis=1)
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    order = np.argsort(-(probes @ vectors.T), axis=1)
    load_before = load_average()
    try:
        store.drop_collections()
        store.ensure_collections()
        t0 = time.perf_counter()
        for start in range(0, len(ids), 1000):
            store.upsert_items(
                [
                    item_row(ids[i], "", [], "", vector=vectors[i])
                    for i in range(start, min(start + 1000, len(ids)))
                ]
            )
        inserted_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        store.flush()
        flushed_s = time.perf_counter() - t0
        client = MilvusClient(uri=settings.milvus_uri)
        configs = [(ef, k) for ef in efs] + [(ef, 200) for ef in efs if ef >= 200]
        found: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
        latency: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
        try:
            for n, probe in enumerate(probes):
                for ef, limit in configs:
                    t1 = time.perf_counter()
                    hits = client.search(
                        store.items.name,
                        data=[probe.tolist()],
                        limit=limit,
                        output_fields=["item_id"],
                        search_params={"metric_type": "IP", "params": {"ef": ef}},
                        consistency_level="Bounded",
                    )
                    if n >= 3:  # warm-up
                        latency[(ef, limit)].append(time.perf_counter() - t1)
                    exact = {ids[i] for i in order[n, :limit]}
                    got = {h["entity"]["item_id"] for h in hits[0]}
                    found[(ef, limit)].append(len(got & exact) / limit)
        finally:
            client.close()
    finally:
        with contextlib.suppress(Exception):
            store.drop_collections()
        store.close()
    return {
        "vectors": len(ids),
        "dim": int(vectors.shape[1]),
        "queries": queries,
        "query": f"normalised mean of {history} random catalogue vectors",
        "index": {"type": settings.index_type, **settings.index_params},
        "insert_s": inserted_s,
        "flush_index_s": flushed_s,
        "runs": [
            {
                "ef": ef,
                "k": limit,
                "recall": float(np.mean(found[(ef, limit)])),
                "min_recall": float(np.min(found[(ef, limit)])),
                "latency_ms": {q: v * 1000 for q, v in quantiles(latency[(ef, limit)]).items()},
            }
            for ef, limit in configs
        ],
        "load_average": [load_before, load_average()],
    }


def render_recall(section: dict[str, Any]) -> str:
    lines = [
        "| ef | k | recall@k | min recall | p50 ms | p99 ms |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in section["runs"]:
        lat = r["latency_ms"]
        lines.append(
            f"| {r['ef']} | {r['k']} | {r['recall']:.3f} | {r['min_recall']:.2f} | "
            f"{lat['p50']:.1f} | {lat['p99']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.milvus``: :func:`recall_at_scale` on a real engine of its own."""
    import argparse
    import json

    from core.config import REPO_ROOT

    parser = argparse.ArgumentParser(prog="python -m bench.milvus", description=__doc__)
    parser.add_argument("--efs", default="10,16,24,32,48,64,128,256")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--cache-dir", type=Path, default=REPO_ROOT / "var" / "cache" / "eval")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "reports" / "bench_recall.json")
    args = parser.parse_args(argv)
    ids, vectors, sources = catalogue_vectors(args.cache_dir)
    efs = sorted({int(x) for x in args.efs.split(",")})
    with engine_settings("recall-") as settings:
        section = recall_at_scale(settings, ids, vectors, efs, args.queries)
    section["sources"] = sources
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(section, indent=2) + "\n")
    print(render_recall(section))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
