"""Top-K recommendation metrics (pure numpy), one user at a time plus aggregates.

Conventions (the hand-computed tests in ``tests/training/evaluation`` pin them):

* ``ranked`` is a user's recommendation list, best first; ``relevant`` the held-out items.
* Recall@K = hits in the top K / ``min(K, |relevant|)``: with a time split a user can have
  hundreds of held-out items, and plain ``hits / |relevant|`` would then be bounded by
  ``K / |relevant|``; the truncated denominator (Liang et al., 2018) keeps 1.0 reachable.
  It equals plain recall whenever ``|relevant| <= K``.
* NDCG@K: binary gains, ``DCG = sum 1 / log2(rank + 1)`` over hits (rank from 1), divided
  by the DCG of an ideal list with ``min(K, |relevant|)`` hits.
* MRR@K: ``1 / rank`` of the first hit within the top K, 0 without one.
* HitRate@K: 1 when the top K holds at least one relevant item.
* Catalogue coverage@K: distinct items in all users' top K / catalogue size.
* Intra-list diversity: mean pairwise cosine *distance* ``1 - cos`` between the items of a
  list, from item vectors (pairs where a vector is all-zero are skipped).
* Novelty: mean self-information ``-log2 p(i)`` of recommended items, with
  ``p(i) = (users who interacted with i in training + 1) / (training users + 1)`` (add-one
  smoothing, so never-seen items get the highest finite novelty).

Users without relevant items are skipped by the accuracy aggregates.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence

import numpy as np


def _hits(ranked: Sequence[str], relevant: Collection[str], k: int) -> list[bool]:
    return [item in relevant for item in list(ranked)[:k]]


def recall_at_k(ranked: Sequence[str], relevant: Collection[str], k: int) -> float:
    """Hits in the top ``k`` over ``min(k, |relevant|)`` (see module docstring)."""
    if not relevant:
        return 0.0
    return sum(_hits(ranked, relevant, k)) / min(k, len(relevant))


def ndcg_at_k(ranked: Sequence[str], relevant: Collection[str], k: int) -> float:
    """Binary-gain NDCG with an ideal list of ``min(k, |relevant|)`` hits."""
    if not relevant:
        return 0.0
    dcg = sum(1.0 / np.log2(r + 2) for r, hit in enumerate(_hits(ranked, relevant, k)) if hit)
    idcg = sum(1.0 / np.log2(r + 2) for r in range(min(k, len(relevant))))
    return float(dcg / idcg)


def reciprocal_rank(ranked: Sequence[str], relevant: Collection[str], k: int) -> float:
    """``1 / rank`` of the first relevant item in the top ``k``; 0 without one."""
    for r, hit in enumerate(_hits(ranked, relevant, k)):
        if hit:
            return 1.0 / (r + 1)
    return 0.0


def hit_rate_at_k(ranked: Sequence[str], relevant: Collection[str], k: int) -> float:
    """1.0 when the top ``k`` contains a relevant item, else 0.0."""
    return 1.0 if any(_hits(ranked, relevant, k)) else 0.0


def catalogue_coverage(lists: Iterable[Sequence[str]], catalogue_size: int, k: int) -> float:
    """Share of the catalogue that appears in at least one top-``k`` list."""
    if catalogue_size <= 0:
        return 0.0
    seen: set[str] = set()
    for ranked in lists:
        seen.update(list(ranked)[:k])
    return len(seen) / catalogue_size


def intra_list_diversity(
    ranked: Sequence[str], vectors: Mapping[str, np.ndarray], k: int
) -> float | None:
    """Mean pairwise ``1 - cosine`` of the top-``k`` items; ``None`` with fewer than 2 usable
    vectors (then the user is left out of the average)."""
    vecs = [np.asarray(vectors[i], dtype=np.float64) for i in list(ranked)[:k] if i in vectors]
    vecs = [v for v in vecs if np.any(v)]
    if len(vecs) < 2:
        return None
    m = np.stack(vecs)
    m = m / np.linalg.norm(m, axis=1, keepdims=True)
    sims = m @ m.T
    iu = np.triu_indices(len(vecs), k=1)
    return float(np.mean(1.0 - sims[iu]))


def self_information(popularity: Mapping[str, int], n_users: int) -> dict[str, float]:
    """``item -> -log2((count + 1) / (n_users + 1))`` for the items in ``popularity``."""
    return {i: float(-np.log2((c + 1) / (n_users + 1))) for i, c in popularity.items()}


def novelty(ranked: Sequence[str], info: Mapping[str, float], default: float, k: int) -> float:
    """Mean self-information of the top ``k`` (``default`` for items missing from ``info``,
    i.e. never seen in training); 0 for an empty list."""
    top = list(ranked)[:k]
    if not top:
        return 0.0
    return float(np.mean([info.get(i, default) for i in top]))


def evaluate_lists(
    recs: Mapping[str, Sequence[str]],
    relevant: Mapping[str, Collection[str]],
    *,
    catalogue_size: int,
    item_vectors: Mapping[str, np.ndarray] | None = None,
    info: Mapping[str, float] | None = None,
    info_default: float = 0.0,
    recall_ks: Sequence[int] = (10, 20),
    k: int = 10,
    mrr_k: int = 20,
) -> dict[str, float]:
    """All metrics over the users of ``relevant`` (users with an empty set are skipped;
    a user missing from ``recs`` counts as an empty list).

    Keys: ``recall@{k}`` for each of ``recall_ks``, ``ndcg@{k}``, ``mrr@{mrr_k}``,
    ``hit_rate@{k}``, ``coverage@{k}``, ``ild@{k}`` (only with ``item_vectors``),
    ``novelty@{k}`` (only with ``info``) and ``users``.
    """
    users = [u for u, rel in relevant.items() if rel]
    out: dict[str, float] = {"users": float(len(users))}
    pairs = [(list(recs.get(u, [])), relevant[u]) for u in users]
    lists = [r for r, _ in pairs]

    def mean(values: list[float]) -> float:
        return float(np.mean(values)) if values else 0.0

    for rk in recall_ks:
        out[f"recall@{rk}"] = mean([recall_at_k(r, s, rk) for r, s in pairs])
    out[f"ndcg@{k}"] = mean([ndcg_at_k(r, s, k) for r, s in pairs])
    out[f"mrr@{mrr_k}"] = mean([reciprocal_rank(r, s, mrr_k) for r, s in pairs])
    out[f"hit_rate@{k}"] = mean([hit_rate_at_k(r, s, k) for r, s in pairs])
    out[f"coverage@{k}"] = catalogue_coverage(lists, catalogue_size, k)
    if item_vectors is not None:
        ild = [intra_list_diversity(r, item_vectors, k) for r in lists]
        out[f"ild@{k}"] = mean([d for d in ild if d is not None])
    if info is not None:
        out[f"novelty@{k}"] = mean([novelty(r, info, info_default, k) for r in lists if r])
    return out


def per_user_ndcg(
    recs: Mapping[str, Sequence[str]], relevant: Mapping[str, Collection[str]], k: int = 10
) -> dict[str, float]:
    """``user -> NDCG@k`` for users with relevant items (for paired comparisons)."""
    return {u: ndcg_at_k(list(recs.get(u, [])), rel, k) for u, rel in relevant.items() if rel}


def paired_bootstrap(
    a: Mapping[str, float], b: Mapping[str, float], *, samples: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Mean of ``a - b`` over common users and its 95% percentile-bootstrap interval
    (users resampled with replacement), so small differences on ~100 users are not
    over-read."""
    users = sorted(set(a) & set(b))
    if not users:
        return {"diff": 0.0, "low": 0.0, "high": 0.0, "users": 0.0}
    d = np.array([a[u] - b[u] for u in users])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(samples, len(d)))
    boots = d[idx].mean(axis=1)
    return {
        "diff": float(d.mean()),
        "low": float(np.percentile(boots, 2.5)),
        "high": float(np.percentile(boots, 97.5)),
        "users": float(len(users)),
    }
