"""The feature ranker's input: one row of numbers per (user, candidate), built the same way
by the training job (from events, at a point in the past) and by the gateway (from Milvus
rows, at request time).

Everything the ranker sees is here, in one fixed order (:data:`FEATURES`); a model is
exported with that list, and the gateway refuses a model whose list differs. Values are
scaled to roughly ``[0, 1]`` without catalogue-specific constants: ranks become reciprocal
ranks, popularity is relative to the catalogue's most popular item, ages are logs of days.
The segment source is left out on purpose: the training job cannot replay segments at past
points in time, so it would be a feature seen only when serving.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from core.behaviour import SECONDS_PER_DAY

#: the sources whose rank is a feature (see the module docstring for why not ``segment``)
RANKED_SOURCES = ("ann", "co_occurrence", "popular", "sequence")
FEATURES = (
    "ann_rr",  # 1 / (1 + rank) in the ANN list, 0 when absent
    "co_occurrence_rr",
    "popular_rr",
    "sources",  # share of the ranked sources that found the item
    "co_occurrence_score",  # log1p of the summed neighbour gains over the history seeds
    "cos_mean",  # cosine to the normalised mean of the history's item vectors
    "cos_max",  # best cosine to one history item
    "cos_last",  # cosine to the most recent history item
    "popularity",  # log1p(popularity) / log1p(top popularity in the catalogue)
    "age",  # log1p(days since the item appeared) / 10, against the catalogue's clock
    "age_known",  # 1 when the item has a creation (or first-seen) time
    "category_affinity",  # the user's interest weights summed over the item's categories
    "history_len",  # log1p(the user's positives) / 10
    "sequence_rr",  # 1 / (1 + rank) in the sequence model's list, 0 when absent
    "sequence_logp",  # the sequence model's log-probability among the candidates
)
_COLUMN = {name: n for n, name in enumerate(FEATURES)}
_RR_COLUMNS = [_COLUMN[f"{source}_rr"] for source in RANKED_SOURCES]
CO_SEEDS = 10  # most recent history items whose neighbours are expanded
NEW_ITEM_DAYS = 90.0  # an item without positives counts as new this long after it appeared


def is_new(popularity: float, created_at: float, now: float) -> bool:
    """No positive interaction yet, and either no known first appearance (no event at all)
    or a recent one: exploration's candidates. An old item that only ever got negatives is
    not new, just unliked."""
    if popularity > 0:
        return False
    return created_at <= 0 or now - created_at < NEW_ITEM_DAYS * SECONDS_PER_DAY


def co_occurrence_scores(
    neighbours: Sequence[Sequence[str]],
) -> tuple[dict[str, float], dict[str, int]]:
    """Neighbour scores from the co-occurrence lists of the most recent history items
    (newest first): ``sum over seeds of 0.9 ** seed_rank / (1 + neighbour_rank)``, and for
    each neighbour the seed that gave it most (its index), which explains the pick."""
    scores: dict[str, float] = {}
    seed_of: dict[str, int] = {}
    get = scores.get
    for h_rank, items in enumerate(neighbours[:CO_SEEDS]):
        decay = 0.9**h_rank  # once per seed: this loop runs ~1,000 times per request
        for n_rank, item in enumerate(items):
            gain = decay / (1 + n_rank)
            total = get(item, 0.0)
            if gain > total:
                seed_of[item] = h_rank
            scores[item] = total + gain
    return scores, seed_of


@dataclass(frozen=True)
class UserSide:
    """What the features need of the user: history vectors (newest first, unit norm),
    interest weights per category, and the number of positives."""

    history_vectors: np.ndarray  # (h, d), possibly h = 0
    interests: Mapping[str, float]
    history_len: int


@dataclass(frozen=True)
class CatalogueClock:
    """Catalogue-wide references: the top popularity and the newest item's time (epoch
    seconds), so that features do not depend on the catalogue's size or the wall clock."""

    top_popularity: float
    now: float


def feature_matrix(
    user: UserSide,
    clock: CatalogueClock,
    vectors: np.ndarray,
    ranks: Sequence[Mapping[str, int]],
    co_scores: Sequence[float] | np.ndarray,
    popularity: Sequence[float] | np.ndarray,
    created_at: Sequence[float] | np.ndarray,
    categories: Sequence[Sequence[str]],
    sequence_scores: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """The ``(n, len(FEATURES))`` float32 matrix for ``n`` candidates (``vectors`` unit norm,
    ``ranks`` 0-based per source, ``created_at`` epoch seconds with 0 for unknown,
    ``sequence_scores`` the sequence model's logits, ``None`` when it is not served: then
    every candidate gets the uniform log-probability, which says nothing)."""
    n = len(ranks)
    out = np.zeros((n, len(FEATURES)), dtype=np.float32)
    if n == 0:
        return out
    # one pass over the ranks (the gateway builds this matrix on every Recommend)
    rr = np.asarray(
        [[1.0 / (1 + r[s]) if s in r else 0.0 for s in RANKED_SOURCES] for r in ranks],
        dtype=np.float64,
    )
    out[:, _RR_COLUMNS] = rr
    out[:, 3] = np.count_nonzero(rr, axis=1) / len(RANKED_SOURCES)
    out[:, 4] = np.log1p(np.asarray(co_scores, dtype=np.float64))
    history = user.history_vectors
    if len(history):
        cand = np.asarray(vectors, dtype=np.float32)
        sims = cand @ history.T  # (n, h)
        mean = history.mean(axis=0)
        mean /= np.linalg.norm(mean) or 1.0
        out[:, 5] = cand @ mean
        out[:, 6] = sims.max(axis=1)
        out[:, 7] = sims[:, 0]
    pop = np.maximum(np.asarray(popularity, dtype=np.float64), 0.0)
    out[:, 8] = np.log1p(pop) / (np.log1p(max(clock.top_popularity, 0.0)) or 1.0)
    created = np.asarray(created_at, dtype=np.float64)
    known = created > 0
    age_days = np.maximum(clock.now - created, 0.0) / SECONDS_PER_DAY
    out[:, 9] = np.where(known, np.log1p(age_days) / 10.0, 0.0)
    out[:, 10] = known
    interest = user.interests.get
    out[:, 11] = [sum([interest(c, 0.0) for c in cats]) for cats in categories]
    out[:, 12] = np.log1p(user.history_len) / 10.0
    out[:, _COLUMN["sequence_logp"]] = log_softmax(sequence_scores, n)
    return out


def log_softmax(scores: Sequence[float] | np.ndarray | None, n: int) -> np.ndarray:
    """Log-probabilities of ``scores`` among themselves (scale-free across users and model
    releases); ``-log n`` each when there are none."""
    if scores is None:
        return np.full(n, -np.log(max(n, 1)), dtype=np.float64)
    x = np.asarray(scores, dtype=np.float64)
    if not len(x):
        return x
    top = x.max()
    return x - top - np.log(np.exp(x - top).sum())
