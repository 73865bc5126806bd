"""The click-only shop catalogue: loadable by the generic loader as it is, and with the
mechanisms its docstring promises (so a result on it can be read against them)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from training.data import load_dataset
from training.data.synthetic import ShopShape, shop_catalogue, write_shop

SMALL = ShopShape(users=300, items=400, days=60)


def test_the_generic_loader_takes_it_unchanged_and_every_event_is_a_positive(
    tmp_path: Path,
) -> None:
    data = load_dataset(write_shop(tmp_path / "shop", SMALL))
    assert not data.report.malformed and not data.report.collapsed
    assert data.report.counts["events_kept"] == data.report.counts["events_read"]
    assert set(data.events["event_type"]) == {"view", "click", "purchase"}  # no ratings
    assert (data.events["weight"] > 0).all()
    span = data.events["timestamp"].max() - data.events["timestamp"].min()
    assert pd.Timedelta(days=50) < span <= pd.Timedelta(days=SMALL.days)


def test_funnel_release_dates_and_companions() -> None:
    events, items = shop_catalogue(SMALL, seed=1)
    assert events.equals(shop_catalogue(SMALL, seed=1)[0])  # seeded
    released = items.set_index("item_id")["created_at"]
    assert (events["timestamp"] >= events["item_id"].map(released)).all()  # none before sale
    first = events.groupby(["user_id", "item_id", "event_type"])["timestamp"].min().unstack()
    clicked = first["click"].notna()
    assert (first.loc[clicked, "view"] < first.loc[clicked, "click"]).all()  # a click was a view
    pairs = zip(items["categories"], items["title"], strict=True)
    assert all(c.lower() in t.lower() for c, t in pairs)  # the text names the category
    # after a purchase the next view is mostly one fixed item per purchased item (its
    # companion); after a plain view it is not
    assert _agreement(events, "purchase") > 3 * _agreement(events, "view")


def _agreement(events: pd.DataFrame, after: str) -> float:
    """Over items with at least 3 ``after`` events followed by a view, the share of those
    next views that go to the item's most common next item."""
    ordered = events[events["event_type"] != "click"].sort_values(
        ["user_id", "timestamp"], kind="stable"
    )
    ordered = ordered.assign(next=ordered.groupby("user_id")["item_id"].shift(-1)).dropna()
    ordered = ordered[(ordered["event_type"] == after) & (ordered["next"] != ordered["item_id"])]
    counts = ordered.groupby("item_id")["next"].agg(["size", lambda s: s.value_counts().iloc[0]])
    counts = counts[counts["size"] >= 3]
    return float(counts.iloc[:, 1].sum() / counts["size"].sum())
