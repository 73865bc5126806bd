"""Milvus HNSW recall@10 against exact inner-product search, and its latency.

Queries are user-tower vectors of indexed users; the exact answer is NumPy over every item
vector read back from Milvus. ``gateway`` queries also exclude the user's history with the
same ``item_id not in [...]`` filter the gateway's ANN source uses; ``bounded`` is the plain
search at Bounded consistency instead of the collections' Strong (what a Strong read costs).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from bench.util import load_average, quantiles
from core.config import Settings
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
