"""Popularity's half-life is the catalogue's own: chosen on the last windows of its events."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from core.behaviour import (
    DEFAULT_HALF_LIFE_DAYS,
    choose_half_life,
    half_life_scores,
    largest_within_one_se,
    popularity_half_life,
)
from training.data import load_dataset
from training.data.synthetic import ShopShape, write_shop


def _lasting(users: int = 300, items: int = 200, seed: int = 0) -> pd.DataFrame:
    """The same items stay popular for two years (a Zipf law fixed in time): the longer the
    memory, the less noise in the counts."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, items + 1)
    rows = []
    start = pd.Timestamp("2020-01-01", tz="UTC")
    for u in range(users):
        picked = rng.choice(items, size=20, replace=False, p=p / p.sum())
        days = np.sort(rng.uniform(0, 730, size=20))
        times = [start + pd.Timedelta(days=d) for d in days]
        rows += [(f"u{u}", f"i{i}", t) for i, t in zip(picked, times, strict=True)]
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    return events.assign(weight=1.0)


def test_a_catalogue_whose_items_fade_in_days_gets_a_short_half_life(tmp_path: Path) -> None:
    shop = load_dataset(write_shop(tmp_path / "shop", ShopShape(users=600, items=500, days=60)))
    scores, users = half_life_scores(shop.events)
    assert users >= 100
    assert choose_half_life(shop.events) <= 14  # appeal halves 14 days after release
    assert max(scores[3.0], scores[7.0]) > 1.2 * scores[365.0]


def test_a_catalogue_whose_favourites_last_gets_a_long_one() -> None:
    assert choose_half_life(_lasting()) == 365.0


def test_too_few_users_to_choose_on_keep_the_default_and_a_setting_wins() -> None:
    few = _lasting(users=10)
    assert choose_half_life(few, min_users=50) == DEFAULT_HALF_LIFE_DAYS
    assert popularity_half_life(few, configured=2.5) == 2.5


def test_a_shorter_memory_has_to_win_by_more_than_noise() -> None:
    """The one-standard-error rule: a half-life ahead by less than the standard error of
    the paired per-user difference gives way to the longer one; a clear lead does not."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 0.2, size=100)
    noise = rng.normal(0, 0.05, size=100)
    slightly = np.column_stack([base + noise + 0.001, base])  # 30 days ahead by noise
    assert largest_within_one_se(slightly, [30.0, 365.0]) == 365.0
    clearly = np.column_stack([base + 0.05, base])  # every user better with 30 days
    assert largest_within_one_se(clearly, [30.0, 365.0]) == 30.0
