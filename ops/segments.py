"""Fit user segments: spherical k-means over user vectors, with each segment's popular items.

A job (``python -m ops.segments``, also run by the demo after indexing) refits the
centroids and rewrites every user's segment; between refits the gateway assigns a changed
user online to the nearest centroid (a search on the segments collection).
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter

import numpy as np

from core.config import get_settings
from core.milvus_schema import SEGMENT_POPULAR, USER_FIELDS
from core.rows import segment_row, user_row
from services.vectors.store import VectorStore

log = logging.getLogger(__name__)


def spherical_kmeans(
    vectors: np.ndarray, k: int, iterations: int = 50, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm centroids and labels maximising cosine similarity; k-means++ start."""
    rng = np.random.default_rng(seed)
    n = len(vectors)
    k = max(1, min(k, n))
    centroids = [vectors[rng.integers(n)]]
    for _ in range(1, k):
        dist = 1.0 - np.max(vectors @ np.stack(centroids).T, axis=1)
        probs = np.clip(dist, 0, None)
        total = probs.sum()
        index = rng.choice(n, p=probs / total) if total > 0 else rng.integers(n)
        centroids.append(vectors[index])
    c = np.stack(centroids)
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(iterations):
        new_labels = np.argmax(vectors @ c.T, axis=1)
        if np.array_equal(new_labels, labels) and _ > 0:
            break
        labels = new_labels
        for j in range(k):
            members = vectors[labels == j]
            if len(members):
                mean = members.sum(axis=0)
                c[j] = mean / (np.linalg.norm(mean) or 1.0)
    return c.astype(np.float32), labels


def fit_segments(store: VectorStore, k: int = 8, seed: int = 0) -> dict[str, int]:
    """Refit segments from every user row in Milvus; returns users per segment."""
    users = store.scan(store.users.name, [*USER_FIELDS, "vector"])  # rewritten whole below
    if not users:
        return {}
    vectors = np.stack([u["vector"] for u in users]).astype(np.float32)
    centroids, labels = spherical_kmeans(vectors, k, seed=seed)
    sizes: dict[str, int] = {}
    rows = []
    for j, centroid in enumerate(centroids):
        members = [u for u, label in zip(users, labels, strict=True) if label == j]
        counts = Counter(i for u in members for i in u["recent_items"])
        segment_id = f"seg-{j}"
        sizes[segment_id] = len(members)
        popular = [i for i, _ in counts.most_common(SEGMENT_POPULAR)]
        rows.append(segment_row(segment_id, centroid, popular, len(members)))
    store.replace_segments(rows)
    updated = [
        user_row(
            u["user_id"],
            segment=f"seg-{label}",
            interests=u["interests"],
            recent_items=u["recent_items"],
            seen_items=u["seen_items"],
            history_size=u["history_size"],
            updated_at=u["updated_at"],
            vector=u["vector"],
        )
        for u, label in zip(users, labels, strict=True)
    ]
    for start in range(0, len(updated), 500):
        store.upsert_users(updated[start : start + 500])
    log.info("fitted %d segments over %d users", len(rows), len(users))
    return sizes


def main(argv: list[str] | None = None) -> int:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m ops.segments", description=__doc__)
    parser.add_argument("-k", type=int, default=settings.segments)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=settings.log_level)
    store = VectorStore(settings)
    store.ensure_collections()
    print(fit_segments(store, args.k, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
