"""How many of a list's slots go to new items: chosen per catalogue, as popularity's
half-life is.

The gateway gives the last slots of each list to new items (no positive interaction yet)
that the content ANN matches best (:func:`core.fusion.explore`), so that their behaviour
can start. What a slot buys depends on the catalogue: where appeal fades in weeks (a
shop's arrivals) a new item in the slot is often the user's next pick and *raises* a
list's NDCG; where favourites last for years (films) it displaces one that would have
been picked. :func:`exploration_gains` replays the slots on the last windows of the
catalogue's events (:func:`core.behaviour.next_item_windows`) over a popularity list, and
:func:`choose_exploration_share` keeps the most slots that cost no NDCG beyond noise. The
indexing job runs both on the item vectors it indexed and records the share where the
gateways read it (:mod:`services.events.aggregates`); the ``exploration_share`` setting
overrides it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

import numpy as np

from core import fusion
from core.behaviour import (
    SECONDS_PER_DAY,
    NextItemWindow,
    item_popularity,
    largest_within_one_se,
    ndcg,
    unseen_top,
)
from core.ranking_features import NEW_ITEM_DAYS

#: Slots of a list of :data:`SHOWN` the chooser tries: at least one (new items must get
#: seen), at most three (exploration is a bounded share).
SLOT_CHOICES = (1, 2, 3)
SHOWN = 10
#: Where nothing chose one (too few users to choose on, no job recorded one yet).
DEFAULT_EXPLORATION_SHARE = 0.1
T = TypeVar("T")


def exploration_gains(
    windows: Sequence[NextItemWindow],
    item_ids: Sequence[str],
    vectors: np.ndarray,
    created: np.ndarray,
    *,
    half_life_days: float,
    pool: int,
    choices: Sequence[int] = SLOT_CHOICES,
    k: int = SHOWN,
) -> np.ndarray:
    """``(validation users, len(choices))`` NDCG@k of popularity's list (decayed with
    ``half_life_days``) with its last ``n`` slots given to new items, against each user's
    next new positives after a window's cut (``windows``: the catalogue's events cut by
    :func:`core.behaviour.next_item_windows`). The new items are those with no positive
    before the cut that existed then (``created``: epoch seconds, 0 unknown) and are not
    older than :data:`core.ranking_features.NEW_ITEM_DAYS`, as the gateway's
    :func:`core.ranking_features.is_new`; they are taken as the gateway takes them: the
    newest of the ``pool`` best by cosine to the mean of the user's history vectors
    (``vectors``, one row per ``item_ids``). Users without a positive before the cut have
    no content match and are left out."""
    ids = [str(i) for i in item_ids]
    row_of = {item: r for r, item in enumerate(ids)}
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    created = np.asarray(created, dtype=np.float64)
    out: list[np.ndarray] = []
    for w in windows:
        age, new, users = _replayed(w, ids, created, row_of)
        if not users or not len(new):
            continue
        scores = item_popularity(w.before, half_life_days)
        order = sorted(scores, key=lambda i: (-scores[i], i))
        profiles = np.stack(
            [
                unit[[row_of[str(i)] for i in w.seen[u] if str(i) in row_of]].mean(axis=0)
                for u in users
            ]
        )
        match = profiles @ unit[new].T
        every, ages = np.ones(len(new), dtype=bool), age[new].tolist()
        gains = np.zeros((len(users), len(choices)))
        for r, user in enumerate(users):
            seen = {str(i) for i in w.seen[user]}
            relevant = {str(i) for i in w.targets[user]}
            slots = fusion.slot_order(match[r], every, ages, pool)[: max(choices)]
            picked = [ids[new[i]] for i in slots]
            base = unseen_top(order, seen, k)
            for c, n in enumerate(choices):
                gains[r, c] = ndcg(with_new_slots(base, picked, n, k), relevant, k)
        out.append(gains)
    return np.concatenate(out) if out else np.zeros((0, len(choices)))


def with_new_slots(base: Sequence[T], new_best: Sequence[T], n: int, k: int = SHOWN) -> list[T]:
    """``base``'s first ``k - n`` items (none of the chosen new ones), then ``new_best[:n]``
    in the last slots: the gateway's placement (:func:`core.fusion.explore`) for a ``base``
    without new items, as popularity's lists are (that function would also count new items
    already in ``base`` against the ``n`` slots); with fewer new items than slots, ``base``
    keeps the slots left, as the gateway's list does."""
    extra = list(new_best[:n])
    taken = set(extra)
    return [i for i in base if i not in taken][: k - len(extra)] + extra


def _replayed(
    w: NextItemWindow, ids: list[str], created: np.ndarray, row_of: Mapping[str, int]
) -> tuple[np.ndarray, np.ndarray, list[object]]:
    """At window ``w``'s cut: every item's age (seconds; inf when unknown), the positions of
    the new items in ``ids``, and the users the replay scores (a target after the cut and a
    history in ``row_of`` before it)."""
    liked = {str(i) for i in w.before["item_id"].unique()}
    age = np.where(created > 0, w.cut - created, np.inf)
    fresh = (created <= 0) | ((age >= 0) & (age < NEW_ITEM_DAYS * SECONDS_PER_DAY))
    new = np.flatnonzero(fresh & np.array([i not in liked for i in ids], dtype=bool))
    users = [u for u in w.targets if any(str(i) in row_of for i in w.seen.get(u, ()))]
    return age, new, users


def exploration_items(
    windows: Sequence[NextItemWindow], item_ids: Sequence[str], created: np.ndarray
) -> list[str]:
    """The items whose vectors :func:`exploration_gains` reads on ``windows`` (the new
    items at each cut and the scored users' histories), in ``item_ids`` order: given only
    these, it computes the same, so a job need not hold a large catalogue's every vector."""
    ids = [str(i) for i in item_ids]
    row_of = {item: r for r, item in enumerate(ids)}
    created = np.asarray(created, dtype=np.float64)
    needed: set[str] = set()
    for w in windows:
        _, new, users = _replayed(w, ids, created, row_of)
        if users and len(new):
            needed.update(ids[i] for i in new)
            needed.update(str(i) for u in users for i in w.seen[u] if str(i) in row_of)
    return [i for i in ids if i in needed]


def choose_exploration_share(gains: np.ndarray, min_users: int = 100) -> float:
    """The share of a list's slots for new items, from :func:`exploration_gains` over
    :data:`SLOT_CHOICES`: the most slots whose NDCG trails the best's by at most one standard
    error of the paired difference (:func:`core.behaviour.largest_within_one_se`), over
    :data:`SHOWN`. Among choices the windows cannot tell apart, the most exploration: it is
    what lets new items' behaviour start, which no window's NDCG counts. A slot changes few
    users' lists (one of 29 validation users on MovieLens's evaluation training period), so
    below ``min_users`` validation users the standard error says little:
    :data:`DEFAULT_EXPLORATION_SHARE`."""
    if len(gains) < min_users:
        return DEFAULT_EXPLORATION_SHARE
    return largest_within_one_se(gains, SLOT_CHOICES) / SHOWN
