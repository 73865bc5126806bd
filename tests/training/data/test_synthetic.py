"""The synthetic catalogues (a click-only shop, a music play log): loadable by the generic
loader as they are, and with the mechanisms the module docstring promises (so a result on
them can be read against them)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pandas as pd

from training.data import load_dataset
from training.data.synthetic import (
    MusicShape,
    ShopShape,
    music_catalogue,
    shop_catalogue,
    write_music,
    write_shop,
)

SMALL = ShopShape(users=300, items=400, days=60)
SMALL_MUSIC = MusicShape(users=200, artists=200, days=60)


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


def test_a_play_log_loads_as_clicks(tmp_path: Path) -> None:
    data = load_dataset(write_music(tmp_path / "music", SMALL_MUSIC))
    assert not data.report.malformed and not data.report.collapsed  # "play" is a known type
    assert data.report.counts["events_kept"] == data.report.counts["events_read"]
    assert set(data.events["event_type"]) == {"click"} and (data.events["weight"] > 0).all()
    assert data.items["text"].str.startswith("Artist: ").all()  # the text names the artist


def test_music_replays_albums_artists_and_heavy_listeners() -> None:
    """Each mechanism against the same log generated without it."""
    events, items = music_catalogue(SMALL_MUSIC, seed=1)
    assert events.equals(music_catalogue(SMALL_MUSIC, seed=1)[0])  # seeded
    released = items.set_index("item_id")["created_at"]
    assert (events["timestamp"] >= events["item_id"].map(released)).all()
    replays, album_next, known_artist = _music_stats(events, items)
    assert replays > _music_stats(*_without(replay_rate=0.0))[0] + 0.2
    assert album_next > 10 * _music_stats(*_without(album_rate=0.0))[1]
    assert known_artist > _music_stats(*_without(artist_rate=0.0))[2] + 0.05
    per_user = events.groupby("user_id").size()
    assert per_user.max() > 8 * per_user.median()  # a few listeners play much of the log


def _without(**mechanism: Any) -> tuple[pd.DataFrame, pd.DataFrame]:
    return music_catalogue(dataclasses.replace(SMALL_MUSIC, **mechanism), seed=1)


def _music_stats(events: pd.DataFrame, items: pd.DataFrame) -> tuple[float, float, float]:
    """(share of plays that replay a track, share of first plays that are the album's next
    track after the previous play, share of the other first plays by a known artist)."""
    number = pd.Series(range(len(items)), index=items["item_id"])
    ordered = events.sort_values(["user_id", "timestamp"], kind="stable")
    ordered = ordered.assign(
        n=ordered["item_id"].map(number),
        artist=ordered["item_id"].map(items.set_index("item_id")["artist"]),
    )
    ordered["album_next"] = ordered["n"] == ordered.groupby("user_id")["n"].shift(1) + 1
    ordered["known_artist"] = ordered.duplicated(["user_id", "artist"])
    first = ordered[~ordered.duplicated(["user_id", "item_id"])]
    found = first[~first["album_next"]]
    return (
        1 - len(first) / len(ordered),
        float(first["album_next"].mean()),
        float(found["known_artist"].mean()),
    )
