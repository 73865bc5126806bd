"""A click-only shop catalogue in the generic format, for trying the pipeline's defaults on
data that is not MovieLens: no ratings (``view``, ``click``, ``purchase`` only), a history of
months rather than decades, a catalogue that grows while it is used.

The behaviour has the structure such logs have, each part a known mechanism so a result can
be read against it: users keep to a few categories (taste), items are released throughout
and their appeal fades with age (trends), items are seen through a funnel (every click was a
view, some clicks end in a purchase), and a purchase is often followed by its companion item
(an order a sequence model can learn and a popularity count cannot). Item text names the
category, so a content encoder sees taste too. It says nothing about how any model does on
real data: for that, the evaluation runs on MovieLens and on datasets kept aside::

    python -m training.data.synthetic --out var/datasets/shop
    make train TRAIN_DATA=var/datasets/shop
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

CATEGORIES = (
    "Running", "Hiking", "Cycling", "Swimming", "Yoga", "Camping", "Climbing", "Tennis",
    "Football", "Fishing", "Skiing", "Fitness",
)  # fmt: skip
KINDS = ("shoe", "jacket", "bag", "bottle", "watch", "glove", "cap", "shirt", "mat", "lamp")
ADJECTIVES = ("light", "waterproof", "compact", "warm", "breathable", "durable", "classic")
DAY = 86400


@dataclass(frozen=True)
class ShopShape:
    """How big and how long: the defaults give 2,500 users, 3,000 items, ~60,000 events
    over 120 days (about what ``make train`` takes in minutes on 2 cores)."""

    users: int = 2500
    items: int = 3000
    days: int = 120
    launched_share: float = 0.3  # items already on sale when the log starts
    trend_half_life_days: float = 14.0  # an item's appeal halves this long after release
    sessions_mean: float = 4.0
    session_len_mean: float = 5.0
    click_rate: float = 0.35  # of views
    purchase_rate: float = 0.25  # of clicks
    companion_rate: float = 0.4  # a purchase followed by its companion's view
    stray_rate: float = 0.15  # a view outside the user's categories


def shop_catalogue(
    shape: ShopShape = ShopShape(), seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(events, items)`` frames in the generic format (see the module docstring)."""
    rng = np.random.default_rng(seed)
    n_items = shape.items
    category = rng.integers(0, len(CATEGORIES), n_items)
    launched = rng.random(n_items) < shape.launched_share
    before_log = -rng.random(n_items) * 60 * DAY
    released = np.where(launched, before_log, rng.random(n_items) * shape.days * DAY)
    appeal = rng.lognormal(0.0, 1.0, n_items)
    # each item's companion: an item of its category (a case for the shoe, ...; a random
    # permutation, so now and then the item itself: bought again)
    companion = np.empty(n_items, dtype=np.int64)
    by_category = [np.flatnonzero(category == c) for c in range(len(CATEGORIES))]
    for members in by_category:
        companion[members] = rng.permutation(members) if len(members) > 1 else members
    rows: list[tuple[str, str, str, float]] = []

    def weights(pool: np.ndarray, now: float) -> np.ndarray:
        age = (now - released[pool]) / DAY
        on_sale = age >= 0
        fade = np.power(0.5, np.clip(age, 0, None) / shape.trend_half_life_days)
        w = appeal[pool] * (0.2 + fade) * on_sale
        return w / w.sum() if w.sum() > 0 else np.full(len(pool), 1.0 / len(pool))

    for u in range(shape.users):
        user = f"u{u}"
        taste = rng.dirichlet(np.full(len(CATEGORIES), 0.15))
        arrival = rng.random() * shape.days * DAY
        now = arrival
        for _ in range(1 + rng.poisson(shape.sessions_mean - 1)):
            if now >= shape.days * DAY:
                break
            follow: int | None = None
            for _ in range(1 + rng.poisson(shape.session_len_mean - 1)):
                if follow is not None and released[follow] <= now:
                    item = follow
                else:
                    stray = rng.random() < shape.stray_rate
                    n = len(CATEGORIES)
                    pool = by_category[rng.integers(n) if stray else rng.choice(n, p=taste)]
                    item = int(pool[rng.choice(len(pool), p=weights(pool, now))])
                follow = None
                rows.append((user, f"p{item}", "view", now))
                if rng.random() < shape.click_rate:
                    now += rng.uniform(90, 600)
                    rows.append((user, f"p{item}", "click", now))
                    if rng.random() < shape.purchase_rate:
                        now += rng.uniform(120, 1800)
                        rows.append((user, f"p{item}", "purchase", now))
                        if rng.random() < shape.companion_rate:
                            follow = int(companion[item])
                now += rng.uniform(60, 900)
            now += rng.exponential(10 * DAY)
    start = pd.Timestamp("2025-01-01", tz="UTC").timestamp()
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "timestamp"])
    events["timestamp"] = (events["timestamp"] + start).round().astype("int64")
    events = events.sort_values("timestamp", kind="stable").reset_index(drop=True)
    kind = rng.integers(0, len(KINDS), n_items)
    adjective = rng.integers(0, len(ADJECTIVES), n_items)
    items = pd.DataFrame(
        {
            "item_id": [f"p{i}" for i in range(n_items)],
            "title": [
                f"{ADJECTIVES[adjective[i]].capitalize()} {CATEGORIES[category[i]].lower()} "
                f"{KINDS[kind[i]]} {i}"
                for i in range(n_items)
            ],
            "categories": [CATEGORIES[c] for c in category],
            "description": [
                f"A {ADJECTIVES[adjective[i]]} {KINDS[kind[i]]} for "
                f"{CATEGORIES[category[i]].lower()}."
                for i in range(n_items)
            ],
            "created_at": (released + start).round().astype("int64"),
        }
    )
    return events, items


def write_shop(out: Path, shape: ShopShape = ShopShape(), seed: int = 0) -> Path:
    """Write ``events.csv`` and ``items.csv`` under ``out``."""
    events, items = shop_catalogue(shape, seed)
    out.mkdir(parents=True, exist_ok=True)
    events.to_csv(out / "events.csv", index=False)
    items.to_csv(out / "items.csv", index=False)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("var/datasets/shop"))
    ap.add_argument("--users", type=int, default=ShopShape.users)
    ap.add_argument("--items", type=int, default=ShopShape.items)
    ap.add_argument("--days", type=int, default=ShopShape.days)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    shape = ShopShape(users=args.users, items=args.items, days=args.days)
    out = write_shop(args.out, shape, args.seed)
    events = pd.read_csv(out / "events.csv")
    print(f"{out}: {len(events):,} events, {events['user_id'].nunique():,} users, "
          f"{events['item_id'].nunique():,} items touched of {shape.items:,}; "
          f"{events['event_type'].value_counts().to_dict()}")  # fmt: skip


if __name__ == "__main__":
    main()
