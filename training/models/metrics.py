"""Evaluation metrics (numpy only): Recall@K, ROC AUC and log-loss."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def recall_at_k(
    ranked: Sequence[Sequence[str]], relevant: Sequence[Iterable[str]], k: int = 10
) -> float:
    """Mean over users of ``|top-k ∩ relevant| / |relevant|`` (users without relevant items
    are skipped). ``ranked[u]`` is the user's ranking, best first."""
    scores = []
    for r, rel in zip(ranked, relevant, strict=True):
        rel_set = set(rel)
        if not rel_set:
            continue
        scores.append(len(set(list(r)[:k]) & rel_set) / len(rel_set))
    return float(np.mean(scores)) if scores else 0.0


def roc_auc(labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve via the rank-sum statistic (ties get average ranks).
    NaN when only one class is present."""
    y = np.asarray(labels, dtype=np.float64) > 0.5
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(
    labels: Sequence[float] | np.ndarray, probs: Sequence[float] | np.ndarray, eps: float = 1e-7
) -> float:
    """Mean binary cross-entropy of probabilities (clipped to ``[eps, 1-eps]``)."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1.0 - eps)
    if len(y) == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)))
