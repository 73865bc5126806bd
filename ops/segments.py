"""Fit user segments: PCA of the user vectors, spherical k-means there, popular items.

A job (``python -m ops.segments``: the ``recsys-segments`` CronJob of k8s/base/segments runs
it on a schedule; the demo and ``make eval`` run it after indexing) refits the segments and
rewrites every user's segment; between refits the gateway assigns a changed user online to
the nearest centroid (a search on the segments collection, in the user-vector space).

The user vectors are reduced before clustering: PCA centres them (tower vectors share one
dominant direction: the mean pairwise cosine of MovieLens users is ~0.74) and keeps at most
``MAX_DIMS`` components (fewer when fewer already keep ``MIN_VARIANCE`` of the variance);
k-means runs on those coordinates, L2-normalised (cosine). A segment's stored centroid is the
normalised mean of its members' *full* vectors, so the gateway's nearest-centroid search needs
no projection; how often that online rule agrees with the fitted labels is measured at every
fit (``agreement``, and ``online_agreement`` through the real Milvus search) and reported by
``make eval`` with the segment sizes and silhouettes.

Deleted users take no part: the job reads the event log's tombstones after scanning the user
rows and leaves out every scanned row of a deleted user (one deleted while the scan ran, or a
row written back by mistake) from the fit, the segments' popular items and the writes.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sklearn.decomposition import PCA
from sklearn.metrics import silhouette_score

from core.config import get_settings
from core.milvus_schema import SEGMENT_POPULAR
from core.rows import segment_row
from services.events.scan import Tombstones
from services.vectors.store import StoreUnavailable, VectorStore

log = logging.getLogger(__name__)

MAX_DIMS = 32  # PCA components kept at most
MIN_VARIANCE = 0.9  # fewer components when fewer keep this share of the variance
RESTARTS = 4  # k-means++ starts; the one with the highest total cosine wins
SILHOUETTE_SAMPLE = 5000  # users the silhouettes are computed on (O(n^2))
PCA_FIT_SAMPLE = 100_000  # users the PCA is fitted on; all of them are projected
ONLINE_CHECK = 500  # users whose online (Milvus) assignment is compared with their label
K_SCAN = (4, 8, 12, 16)  # k values `make eval` reports the silhouette of (not a choice)
WRITE_BATCH = 500


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


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


@dataclass(frozen=True)
class Projection:
    """A fitted PCA: subtract ``mean``, project on ``components``, normalise (cosine)."""

    mean: np.ndarray  # (input dims,)
    components: np.ndarray  # (dims, input dims), orthonormal rows
    explained_variance: float  # share of the variance the kept components hold

    @property
    def dims(self) -> int:
        return int(self.components.shape[0])

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        return unit_rows((np.asarray(vectors, dtype=np.float32) - self.mean) @ self.components.T)


def fit_projection(
    vectors: np.ndarray,
    max_dims: int = MAX_DIMS,
    min_variance: float = MIN_VARIANCE,
    seed: int = 0,
) -> Projection | None:
    """PCA to at most ``max_dims`` components (fewer if they keep ``min_variance``).

    None when there is nothing to reduce: ``max_dims`` < 2 (reduction off), or fewer than 3
    users, or vectors without variance.
    """
    n, dim = vectors.shape
    limit = min(max_dims, dim, n - 1)
    if limit < 2:
        return None
    sample = vectors
    if n > PCA_FIT_SAMPLE:
        rng = np.random.default_rng(seed)
        sample = vectors[rng.choice(n, PCA_FIT_SAMPLE, replace=False)]
    pca = PCA(n_components=limit, random_state=seed).fit(sample)
    cumulative = np.cumsum(pca.explained_variance_ratio_)
    if not np.all(np.isfinite(cumulative)):
        return None
    dims = min(limit, max(2, int(np.searchsorted(cumulative, min_variance)) + 1))
    return Projection(
        mean=pca.mean_.astype(np.float32),
        components=pca.components_[:dims].astype(np.float32),
        explained_variance=float(cumulative[dims - 1]),
    )


def cluster(points: np.ndarray, k: int, seed: int = 0, restarts: int = RESTARTS) -> np.ndarray:
    """Spherical k-means labels, best of ``restarts``; numbered 0.. by decreasing size."""
    best: tuple[float, np.ndarray] | None = None
    for start in range(max(1, restarts)):
        centroids, labels = spherical_kmeans(points, k, seed=seed + start)
        score = float(np.sum(points * centroids[labels]))
        if best is None or score > best[0]:
            best = (score, labels)
    assert best is not None
    labels = best[1]
    sizes = np.bincount(labels)
    order = [j for j in np.argsort(-sizes, kind="stable") if sizes[j] > 0]  # empty ones go
    rank = np.full(len(sizes), -1, dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank[labels]


def silhouette(points: np.ndarray, labels: np.ndarray, seed: int = 0) -> float | None:
    """Mean cosine silhouette (on a seeded sample of large sets); None below 2 clusters."""
    n, found = len(points), len(np.unique(labels))
    if found < 2 or found >= n:
        return None
    sample = SILHOUETTE_SAMPLE if n > SILHOUETTE_SAMPLE else None
    try:
        return float(
            silhouette_score(points, labels, metric="cosine", sample_size=sample, random_state=seed)
        )
    except ValueError:  # a sample that drew a single cluster
        return None


@dataclass
class SegmentModel:
    """Labels, full-space centroids and the quality of one fit."""

    labels: np.ndarray  # per user, 0..segments-1 by decreasing size
    centroids: np.ndarray  # (segments, input dims), unit norm: what Milvus stores
    projection: Projection | None
    silhouette_reduced: float | None  # cosine, in the space k-means ran in
    silhouette_full: float | None  # cosine, same labels, on the full user vectors
    agreement: float  # share of users whose nearest full-space centroid is their own


def fit_segment_model(
    vectors: np.ndarray,
    k: int,
    *,
    max_dims: int = MAX_DIMS,
    min_variance: float = MIN_VARIANCE,
    seed: int = 0,
    restarts: int = RESTARTS,
) -> SegmentModel:
    """Reduce (PCA), cluster there, and put the centroids back in the user-vector space."""
    full = unit_rows(np.asarray(vectors, dtype=np.float32))
    projection = fit_projection(full, max_dims, min_variance, seed)
    points = projection.transform(full) if projection is not None else full
    labels = cluster(points, k, seed, restarts)
    centroids = unit_rows(
        np.stack([full[labels == j].mean(axis=0) for j in range(int(labels.max()) + 1)])
    ).astype(np.float32)
    online = np.argmax(full @ centroids.T, axis=1)  # the gateway's rule (inner product)
    return SegmentModel(
        labels=labels,
        centroids=centroids,
        projection=projection,
        silhouette_reduced=silhouette(points, labels, seed),
        silhouette_full=silhouette(full, labels, seed),
        agreement=float(np.mean(online == labels)),
    )


def scan_k(
    vectors: np.ndarray,
    candidates: Sequence[int],
    *,
    max_dims: int = MAX_DIMS,
    min_variance: float = MIN_VARIANCE,
    seed: int = 0,
) -> dict[int, float | None]:
    """Reduced-space silhouette for each candidate k (reported; k stays the configured one)."""
    full = unit_rows(np.asarray(vectors, dtype=np.float32))
    projection = fit_projection(full, max_dims, min_variance, seed)
    points = projection.transform(full) if projection is not None else full
    return {k: silhouette(points, cluster(points, k, seed), seed) for k in candidates}


@dataclass
class SegmentReport:
    """What one refit produced and how good it is (``make eval``, the job's output)."""

    users: int = 0
    k: int = 0
    sizes: dict[str, int] = field(default_factory=dict)
    reduction: str = "none"  # "pca" or "none"
    input_dims: int = 0
    dims: int = 0
    explained_variance: float | None = None
    silhouette_reduced: float | None = None
    silhouette_full: float | None = None
    agreement: float | None = None  # nearest full-space centroid == label, every user
    online_agreement: float | None = None  # the same through the Milvus segments search
    online_checked: int = 0
    k_scan: dict[int, float | None] = field(default_factory=dict)
    fit_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self) -> list[str]:
        """The report's lines for eval.md."""

        def num(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        if not self.users:
            return ["- no users with a vector: no segments fitted."]
        space = (
            f"PCA to {self.dims} of {self.input_dims} dims ({num(self.explained_variance)} of "
            "the variance), L2-normalised"
            if self.reduction == "pca"
            else f"the full {self.input_dims}-d vectors (no reduction)"
        )
        sizes = ", ".join(f"{s}: {n}" for s, n in self.sizes.items())
        lines = [
            f"- {len(self.sizes)} segments (k={self.k}) over {self.users} users; "
            f"spherical k-means on {space}; fitted in {self.fit_s:.1f} s.",
            f"- Sizes: {sizes}.",
            f"- Silhouette (cosine): {num(self.silhouette_reduced)} in the clustering space, "
            f"{num(self.silhouette_full)} on the full user vectors (same labels).",
            f"- Online assignment (nearest stored centroid, full space) agrees with the fitted "
            f"label for {num(self.agreement)} of the users"
            + (
                f"; through the Milvus segments search: {num(self.online_agreement)} of "
                f"{self.online_checked} checked."
                if self.online_checked
                else "."
            ),
        ]
        if self.k_scan:
            scan = ", ".join(f"k={k}: {num(v)}" for k, v in self.k_scan.items())
            lines.append(
                f"- Silhouette in the clustering space by k (reported, k stays configured): {scan}."
            )
        return lines


def fit_segments(
    store: VectorStore,
    k: int = 8,
    seed: int = 0,
    *,
    max_dims: int = MAX_DIMS,
    min_variance: float = MIN_VARIANCE,
    k_scan: Sequence[int] = (),
    online_check: int = ONLINE_CHECK,
    tombstones: Callable[[], Tombstones] | None = None,
) -> SegmentReport:
    """Refit segments from every user row in Milvus; rewrite each user's segment field.

    Only the ``segment`` field is written (a partial update), and only for users that still
    exist: profiles the gateway updates during the refit keep their new history and vector
    (their label comes from the vector scanned; their next event reassigns them online).
    ``tombstones`` (read after the scan) leaves deleted users out of everything.
    """
    started = time.perf_counter()
    users = store.scan(store.users.name, ["user_id", "recent_items", "vector"])
    if tombstones is not None:
        deleted = tombstones()
        kept = [u for u in users if not deleted.deleted(str(u["user_id"]))]
        if len(kept) < len(users):
            log.info("left out %d rows of deleted users", len(users) - len(kept))
        users = kept
    if not users:
        return SegmentReport(k=k)
    vectors = np.stack([u["vector"] for u in users]).astype(np.float32)
    model = fit_segment_model(vectors, k, max_dims=max_dims, min_variance=min_variance, seed=seed)
    sizes: dict[str, int] = {}
    rows = []
    for j, centroid in enumerate(model.centroids):
        members = [u for u, label in zip(users, model.labels, strict=True) if label == j]
        counts = Counter(i for u in members for i in u["recent_items"])
        segment_id = f"seg-{j}"
        sizes[segment_id] = len(members)
        popular = [i for i, _ in counts.most_common(SEGMENT_POPULAR)]
        rows.append(segment_row(segment_id, centroid, popular, len(members)))
    store.replace_segments(rows)
    assigned = {u["user_id"]: f"seg-{label}" for u, label in zip(users, model.labels, strict=True)}
    ids = list(assigned)
    for start in range(0, len(ids), WRITE_BATCH):
        batch = {i: assigned[i] for i in ids[start : start + WRITE_BATCH]}
        try:
            store.set_user_segments(batch)
        except StoreUnavailable:  # e.g. a user deleted since the check: check again, once
            log.warning("segment write failed; retrying the batch once", exc_info=True)
            store.set_user_segments(batch)
    report = SegmentReport(
        users=len(users),
        k=k,
        sizes=sizes,
        reduction="pca" if model.projection is not None else "none",
        input_dims=int(vectors.shape[1]),
        dims=model.projection.dims if model.projection is not None else int(vectors.shape[1]),
        explained_variance=model.projection.explained_variance if model.projection else None,
        silhouette_reduced=model.silhouette_reduced,
        silhouette_full=model.silhouette_full,
        agreement=model.agreement,
    )
    if online_check > 0:
        rng = np.random.default_rng(seed)
        picked = rng.choice(len(users), min(online_check, len(users)), replace=False)
        hits = [store.nearest_segment(vectors[i], timeout=30.0) for i in picked]
        same = [
            h is not None and h["segment_id"] == assigned[users[i]["user_id"]]
            for i, h in zip(picked, hits, strict=True)
        ]
        report.online_checked = len(same)
        report.online_agreement = float(np.mean(same))
    if k_scan:
        report.k_scan = scan_k(
            vectors, k_scan, max_dims=max_dims, min_variance=min_variance, seed=seed
        )
    report.fit_s = time.perf_counter() - started
    log.info(
        "fitted %d segments over %d users: %s", len(rows), len(users), report.markdown()[2][2:]
    )
    return report


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m ops.segments", description=__doc__)
    parser.add_argument("-k", type=int, default=settings.segments, help="RECSYS_SEGMENTS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-dims", type=int, default=MAX_DIMS, help="PCA components at most (0: no PCA)"
    )
    parser.add_argument(
        "--min-variance", type=float, default=MIN_VARIANCE, help="fewer if they keep this"
    )
    parser.add_argument("--k-scan", type=_ints, default=[], help="e.g. 4,8,12,16: report only")
    parser.add_argument(
        "--online-check", type=int, default=ONLINE_CHECK, help="users checked via Milvus"
    )
    parser.add_argument(
        "--no-tombstones",
        action="store_true",
        help="do not read the event log's deletions (only where no user was ever deleted)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=settings.log_level)
    store = VectorStore(settings)
    try:
        store.ensure_collections()
        report = fit_segments(
            store,
            args.k,
            args.seed,
            max_dims=args.max_dims,
            min_variance=args.min_variance,
            k_scan=args.k_scan,
            online_check=args.online_check,
            tombstones=None if args.no_tombstones else lambda: Tombstones.load(settings),
        )
    finally:
        store.close()
    print(json.dumps(report.to_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
