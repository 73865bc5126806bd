"""The share of each list's slots for new items is the catalogue's own: chosen on the last
windows of its events, over the item vectors it indexed."""

from __future__ import annotations

import numpy as np
import pandas as pd

from core.behaviour import SECONDS_PER_DAY, next_item_windows
from core.exploration import (
    DEFAULT_EXPLORATION_SHARE,
    choose_exploration_share,
    exploration_gains,
)

START = pd.Timestamp("2024-01-01", tz="UTC")
DIM = 16
PER_DAY = 50


def shop_arrivals(
    users: int, *, fresh: bool, seed: int = 0
) -> tuple[pd.DataFrame, list[str], np.ndarray, np.ndarray]:
    """(events, item ids, vectors, creation times) over 60 days: 80 items on sale from the
    start and ``PER_DAY`` arrivals a day. ``fresh``: each user buys, each time, the arrival
    of the last three days closest to their own taste (a shop's arrivals); otherwise the
    old items, by a Zipf law fixed in time, and nobody buys the arrivals (favourites that
    last). Eight purchases a user within ten days; vectors are random directions, tastes
    too."""
    rng = np.random.default_rng(seed)

    def unit(n: int) -> np.ndarray:
        v = rng.normal(size=(n, DIM))
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    ids = [f"old{i}" for i in range(80)] + [
        f"new{d}_{j}" for d in range(60) for j in range(PER_DAY)
    ]
    created = np.array(
        [START.timestamp() - 90 * SECONDS_PER_DAY] * 80
        + [START.timestamp() + d * SECONDS_PER_DAY for d in range(60) for _ in range(PER_DAY)]
    )
    vectors = unit(len(ids))
    zipf = 1.0 / np.arange(1, 81)
    rows = []
    for user, taste in enumerate(unit(users)):
        first, bought = rng.uniform(0, 50), set()
        for _n, day in enumerate(np.sort(first + rng.uniform(0, 10, size=8))):
            if fresh:
                lo, hi = 80 + PER_DAY * max(int(day) - 2, 0), 80 + PER_DAY * (int(day) + 1)
                options = [i for i in range(lo, hi) if i not in bought]
                pick = max(options, key=lambda i: float(vectors[i] @ taste))
            else:
                pick = int(rng.choice(80, p=zipf / zipf.sum()))
            bought.add(pick)
            rows.append((f"u{user}", ids[pick], START + pd.Timedelta(days=float(day))))
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).assign(weight=1.0)
    return events, ids, vectors, created


def test_a_catalogue_whose_users_buy_the_arrivals_gets_more_slots() -> None:
    events, ids, vectors, created = shop_arrivals(600, fresh=True)
    gains = exploration_gains(
        next_item_windows(events), ids, vectors, created, half_life_days=3.0, pool=20
    )
    assert len(gains) >= 100
    assert gains[:, 2].mean() > gains[:, 0].mean() + 0.01  # three slots clearly ahead of one
    assert choose_exploration_share(gains) == 0.3


def test_a_catalogue_whose_favourites_last_keeps_one_slot() -> None:
    events, ids, vectors, created = shop_arrivals(600, fresh=False)
    gains = exploration_gains(
        next_item_windows(events), ids, vectors, created, half_life_days=365.0, pool=20
    )
    assert gains[:, 0].mean() > gains[:, 2].mean()  # each slot displaces a favourite
    assert choose_exploration_share(gains) == 0.1


def test_too_few_users_to_tell_keep_the_default() -> None:
    events, ids, vectors, created = shop_arrivals(40, fresh=True)
    gains = exploration_gains(
        next_item_windows(events), ids, vectors, created, half_life_days=3.0, pool=20
    )
    assert 0 < len(gains) < 100
    assert choose_exploration_share(gains) == DEFAULT_EXPLORATION_SHARE
    assert choose_exploration_share(gains, min_users=len(gains)) > DEFAULT_EXPLORATION_SHARE


def test_only_items_that_existed_unliked_at_the_cut_fill_the_slots() -> None:
    """The slots take an item nobody liked before the cut that was on sale then; an item
    created after the cut is none the gateway could have shown (no new item: no row)."""
    day = SECONDS_PER_DAY
    events = pd.DataFrame(
        {
            "user_id": ["a", "b", "a"],
            "item_id": ["h", "liked", "later"],
            "timestamp": [START + pd.Timedelta(days=d) for d in (0, 1, 2)],
            "weight": 1.0,
        }
    )
    ids, vectors = ["h", "liked", "later"], np.ones((3, 2))
    created = np.array([START.timestamp(), START.timestamp(), START.timestamp() + 5 * day])

    def gains() -> list[list[float]]:
        return exploration_gains(
            next_item_windows(events, (0.6,)), ids, vectors, created, half_life_days=365.0, pool=20
        ).tolist()

    assert gains() == []  # "later" did not exist at the cut (day 1.2)
    created[2] = START.timestamp()  # on sale before the cut: the slot finds it after "liked"
    assert gains() == [[1 / np.log2(3)] * 3]


def test_the_vectors_of_the_items_it_names_are_all_the_replay_reads() -> None:
    """A job hands :func:`exploration_gains` only :func:`exploration_items`' vectors (a large
    catalogue's every vector need not be read): the gains are the same."""
    from core.exploration import exploration_items

    events, ids, vectors, created = shop_arrivals(300, fresh=True)
    needed = exploration_items(next_item_windows(events), ids, created)
    assert 0 < len(needed) < len(ids)
    rows = [ids.index(i) for i in needed]
    every = exploration_gains(
        next_item_windows(events), ids, vectors, created, half_life_days=3.0, pool=20
    )
    some = exploration_gains(
        next_item_windows(events), needed, vectors[rows], created[rows], half_life_days=3.0, pool=20
    )
    assert np.array_equal(every, some)
