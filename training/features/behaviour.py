"""Behaviour signals shared by offline jobs and the online gateway.

Pure functions of events or histories, so the index built offline and the profile updated
online are computed the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

INTEREST_DECAY = 0.9  # weight of the n-th most recent item: 0.9**n


def interests(history: Sequence[tuple[str, Sequence[str]]], top: int = 10) -> dict[str, float]:
    """Time-decayed category shares of a most-recent-first history, summing to 1."""
    scores: dict[str, float] = {}
    for rank, (_, categories) in enumerate(history):
        for category in categories:
            gain = INTEREST_DECAY**rank / max(len(categories), 1)
            scores[category] = scores.get(category, 0.0) + gain
    total = sum(scores.values()) or 1.0
    ranked = sorted(scores.items(), key=lambda cw: -cw[1])[:top]
    return {c: round(w / total, 4) for c, w in ranked}


def item_popularity(events: pd.DataFrame) -> dict[str, float]:
    """Positive interactions per item."""
    counts = events.loc[events["weight"] > 0, "item_id"].value_counts()
    return {str(k): float(v) for k, v in counts.items()}


def co_occurrence(
    events: pd.DataFrame, top: int = 50, min_support: int = 2
) -> dict[str, list[str]]:
    """Item-to-item neighbours by cosine similarity of their positive-user sets (ItemKNN).

    ``cos(a, b) = |U_a ∩ U_b| / sqrt(|U_a| |U_b|)``; pairs seen together by fewer than
    ``min_support`` users are dropped as noise. Returns the ``top`` neighbours of each item,
    best first.
    """
    from scipy import sparse

    pos = events.loc[events["weight"] > 0, ["user_id", "item_id"]].drop_duplicates()
    if pos.empty:
        return {}
    users = pd.Categorical(pos["user_id"])
    items = pd.Categorical(pos["item_id"])
    matrix = sparse.csr_matrix(
        (np.ones(len(pos), dtype=np.float32), (users.codes, items.codes)),
        shape=(len(users.categories), len(items.categories)),
    )
    co = (matrix.T @ matrix).tocsr()
    degree = np.asarray(co.diagonal(), dtype=np.float32)
    co.setdiag(0)
    co.eliminate_zeros()
    co.data[co.data < min_support] = 0
    co.eliminate_zeros()
    coo = co.tocoo()
    coo.data = coo.data / np.sqrt(degree[coo.row] * degree[coo.col])
    co = coo.tocsr()
    names = np.asarray(items.categories, dtype=object)
    out: dict[str, list[str]] = {}
    for row in range(co.shape[0]):
        start, end = co.indptr[row], co.indptr[row + 1]
        if start == end:
            continue
        cols, vals = co.indices[start:end], co.data[start:end]
        order = np.argsort(-vals, kind="stable")[:top]
        out[str(names[row])] = [str(names[c]) for c in cols[order]]
    return out
