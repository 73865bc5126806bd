"""The two ranking kernels that the gateway and the offline evaluation share.

* :func:`rrf` - reciprocal-rank fusion (Cormack et al., SIGIR 2009): a source's item at
  1-based rank ``r`` contributes ``w / (k + r)``. Ranks rather than raw scores, because the
  sources' scores live on unrelated scales (counts, cosines, dot products).
  :func:`fuse_ids` keeps the top ``n`` of the weighted fusion: the gateway's candidates, and
  the feature ranker's training candidates replayed from events.
* :func:`mmr` - greedy maximal marginal relevance (Carbonell & Goldstein, 1998):
  ``argmax (1 - λ)·rel(i) - λ·max_j cos(i, j)`` over the items already picked, with ``rel``
  min-max scaled so that λ means the same whichever scorer produced it.

One implementation of each, so the served order and the evaluated order cannot drift apart;
likewise :func:`explore` and :func:`slot_order`, the exploration slots for new items.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import overload

import numpy as np

RRF_K = 60.0
# Each weighted source's best items keep this share of the candidate slots whatever their
# fused score: with popularity weighted 4, a personal source's first item (2 / 61) would
# otherwise never outscore the 30th popular one (4 / 90), and new items, which only the ANN
# finds, could never be ranked at all.
SOURCE_QUOTA = 0.1


@overload
def rrf(rank: int, k: float = RRF_K) -> float: ...
@overload
def rrf(rank: np.ndarray, k: float = RRF_K) -> np.ndarray: ...
def rrf(rank: int | np.ndarray, k: float = RRF_K) -> float | np.ndarray:
    """The fusion term of a 1-based ``rank`` (scalar or array): ``1 / (k + rank)``."""
    return 1.0 / (k + rank)


def fuse_ids(
    lists: Mapping[str, Sequence[str]], weights: Mapping[str, float], n: int
) -> list[tuple[str, float]]:
    """The top ``n`` ids of the weighted reciprocal-rank fusion of ranked id lists (one per
    source, best first, no repeats within a list), with their fused scores, best first (ties
    by id): each weighted source's first ``SOURCE_QUOTA * n`` ids are kept before the rest by
    score; a source without a weight adds nothing."""
    fused: dict[str, float] = {}
    kept: set[str] = set()
    quota = int(SOURCE_QUOTA * n)
    for source, ids in lists.items():
        weight = float(weights.get(source, 0.0))
        terms = (weight * rrf(np.arange(1, len(ids) + 1))).tolist()
        for rank, item in enumerate(ids):
            fused[item] = fused.get(item, 0.0) + terms[rank]
            if rank < quota and weight > 0:
                kept.add(item)
    ranked = sorted(fused, key=lambda i: (-fused[i], i))
    chosen = [i for i in ranked if i in kept][:n]
    chosen += [i for i in ranked if i not in kept][: n - len(chosen)]
    chosen.sort(key=lambda i: (-fused[i], i))
    return [(i, fused[i]) for i in chosen]


def mmr(relevance: np.ndarray, vectors: np.ndarray | None, k: int, diversity: float) -> np.ndarray:
    """Positions (into ``relevance``) of the ``k`` items MMR picks, in pick order.

    ``vectors`` are the items' unit vectors, row-aligned with ``relevance``. With
    ``diversity <= 0`` (or no vectors) this is relevance order, ties kept in input order.
    """
    rel = np.asarray(relevance, dtype=np.float64)
    n = len(rel)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if diversity <= 0 or vectors is None:
        return np.argsort(-rel, kind="stable")[:k]
    span = float(rel.max() - rel.min())
    rel = (rel - rel.min()) / span if span > 0 else np.ones_like(rel)
    v = np.asarray(vectors, dtype=np.float32)
    sims = v @ v.T
    base = (1 - diversity) * rel
    picked: list[int] = []
    closest = np.zeros(n)  # max cosine to anything picked so far (none yet: no penalty)
    for step in range(min(k, n)):
        gains = base - diversity * closest
        gains[picked] = -np.inf
        best = int(np.argmax(gains))
        picked.append(best)
        closest = sims[best] if step == 0 else np.maximum(closest, sims[best])
    return np.asarray(picked, dtype=np.int64)


def explore(
    picked: Sequence[int],
    new_by_content: Sequence[int],
    is_new: Sequence[bool],
    k: int,
    share: float,
) -> list[int]:
    """``picked`` (positions, final order) with its last ``floor(share * k)`` slots, less the
    new items already picked, given to ``new_by_content`` (positions of new items, best
    content match first) not picked yet: exploration slots for items no behaviour-trained
    ranker can put in a top ``k``."""
    slots = int(share * k) - sum(bool(is_new[i]) for i in picked)
    chosen = set(picked)
    extra = [i for i in new_by_content if i not in chosen][: max(slots, 0)]
    keep = list(picked)
    surplus = len(keep) + len(extra) - k  # picks to give up: the last ones that are not new
    for n in range(len(keep) - 1, -1, -1):
        if surplus <= 0:
            break
        if not is_new[keep[n]]:
            del keep[n]
            surplus -= 1
    return keep + extra


def newest_first(by_content: Sequence[int], ages: Sequence[float], pool: int) -> list[int]:
    """The first ``pool`` of ``by_content`` (new items, best content match first), newest
    first (``ages``: seconds since each appeared, ``inf`` when unknown; ties keep content
    order): the order :func:`explore` fills its slots in. Among new items that all match the
    user's taste about as well, the freshest is the likeliest next pick; a wider pool lets
    freshness outvote relevance (chosen on validation windows of two catalogues,
    ``python -m training.evaluation.exploration``)."""
    head = list(by_content[:pool])
    return sorted(head, key=lambda i: ages[i]) + list(by_content[pool:])


def slot_order(
    content: Sequence[float] | np.ndarray,
    new: Sequence[bool] | np.ndarray,
    ages: Sequence[float],
    pool: int,
) -> list[int]:
    """The positions of the new items (``new``) the content match found (``content``: the
    higher the better, ``-inf`` where it did not find the item), best match first (ties in
    input order), then the first ``pool`` of them newest first (:func:`newest_first`): the
    order :func:`explore` fills its slots in, for the gateway, the ranker's replay and the
    offline analyses alike."""
    score = np.asarray(content, dtype=np.float64)
    found = [i for i in np.argsort(-score, kind="stable").tolist() if new[i] and score[i] > -np.inf]
    return newest_first(found, ages, pool)
