"""Synthetic catalogues in the generic format, for trying the pipeline's defaults on data
that is not MovieLens: a click-only shop (``view``, ``click``, ``purchase``) and a music
play log (``play`` only), each a history of months rather than decades and a catalogue that
grows while it is used.

The behaviour has the structure such logs have, each part a known mechanism so a result can
be read against it. The shop: users keep to a few categories (taste), items are released
throughout and their appeal fades with age (trends), items are seen through a funnel (every
click was a view, some clicks end in a purchase), and a purchase is often followed by its
companion item (an order a sequence model can learn and a popularity count cannot). The
music log: most plays are replays of tracks the user already plays (what a play count is
made of, and what a recommender of *new* tracks must look past), a track is often followed
by the next track of its album, listeners come back to the artists they play, and albums
come out throughout, their pull fading; activity is heavy-tailed (a few listeners play most
of the log). Item text names the category (and the artist), so a content encoder sees taste
too. It says nothing about how any model does on real data: for that, the evaluation runs
on MovieLens and on datasets kept aside::

    python -m training.data.synthetic --out var/datasets/shop
    python -m training.data.synthetic --kind music --out var/datasets/music
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


GENRES = (
    "Rock", "Pop", "Jazz", "Hip hop", "Electronic", "Classical", "Folk", "Metal", "Blues",
    "Soul", "Country", "Reggae",
)  # fmt: skip
SYLLABLES = (
    "ka", "lo", "mir", "ve", "tan", "so", "ri", "del", "mo", "na", "bel", "quin", "tor", "za",
    "fen", "li", "gar", "ush", "pe", "dro",
)  # fmt: skip
WORDS = (
    "night", "river", "gold", "echo", "summer", "glass", "fire", "shadow", "city", "rain",
    "heart", "road", "blue", "silver", "dream", "storm", "light", "ocean", "wild", "stone",
)  # fmt: skip


@dataclass(frozen=True)
class MusicShape:
    """How big and how long: the defaults give 1,200 listeners, 6,360 tracks by 400 artists,
    84,283 plays over 180 days (seed 0; about MovieLens's size, so ``make train`` takes
    minutes)."""

    users: int = 1200
    artists: int = 400
    days: int = 180
    albums_mean: float = 2.0  # per artist
    album_len_mean: float = 8.0
    released_share: float = 0.6  # albums out before the log starts
    release_half_life_days: float = 30.0  # an album's extra pull halves this long after release
    sessions_mean: float = 7.0  # times a (median) listener's activity
    session_len_mean: float = 8.0
    replay_rate: float = 0.5  # a play of a track the listener played before
    album_rate: float = 0.4  # otherwise, the album's next track after a play
    artist_rate: float = 0.35  # otherwise, a track by an artist the listener plays
    stray_rate: float = 0.1  # a discovery outside the listener's genres


def _name(rng: np.random.Generator, parts: int) -> str:
    return "".join(SYLLABLES[j] for j in rng.integers(0, len(SYLLABLES), parts)).capitalize()


def music_catalogue(
    shape: MusicShape = MusicShape(), seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(events, items)`` frames of a music play log (see the module docstring): every
    event a ``play``, one row per track."""
    rng = np.random.default_rng(seed)
    artist_genre = rng.integers(0, len(GENRES), shape.artists)
    artist_pull = rng.lognormal(0.0, 1.2, shape.artists)
    artist_name = [f"{_name(rng, 2)} {_name(rng, 3)}" for _ in range(shape.artists)]
    track_artist: list[int] = []
    track_album: list[str] = []
    track_title: list[str] = []
    released_list: list[float] = []
    album_next: list[int] = []  # the album's next track, -1 after the last
    for a in range(shape.artists):
        for _ in range(1 + rng.poisson(shape.albums_mean - 1)):
            if rng.random() < shape.released_share:
                out = -rng.random() * 365 * DAY
            else:
                out = rng.random() * shape.days * DAY
            album = " ".join(WORDS[j] for j in rng.integers(0, len(WORDS), 2)).title()
            n = 1 + rng.poisson(shape.album_len_mean - 1)
            first = len(track_artist)
            for k in range(n):
                track_artist.append(a)
                track_album.append(album)
                words = rng.integers(0, len(WORDS), 1 + rng.integers(0, 3))
                track_title.append(" ".join(WORDS[j] for j in words).capitalize())
                released_list.append(out)
                album_next.append(first + k + 1 if k + 1 < n else -1)
    artist_of = np.asarray(track_artist)
    released = np.asarray(released_list)
    nxt = np.asarray(album_next)
    genre = artist_genre[artist_of]
    appeal = artist_pull[artist_of] * rng.lognormal(0.0, 0.8, len(artist_of))  # a hit or not
    by_genre = [np.flatnonzero(genre == g) for g in range(len(GENRES))]
    by_artist = [np.flatnonzero(artist_of == a) for a in range(shape.artists)]
    end = shape.days * DAY

    def pick(pool: np.ndarray, now: float) -> int | None:
        age = (now - released[pool]) / DAY
        w = appeal[pool] * (
            1.0 + 4.0 * np.power(0.5, np.clip(age, 0, None) / shape.release_half_life_days)
        )
        w = w * (age >= 0)
        return int(pool[rng.choice(len(pool), p=w / w.sum())]) if w.sum() > 0 else None

    rows: list[tuple[str, str, str, float]] = []
    for u in range(shape.users):
        user = f"l{u}"
        taste = rng.dirichlet(np.full(len(GENRES), 0.2))
        activity = rng.lognormal(0.0, 0.9)
        now = rng.random() * end
        plays: dict[int, int] = {}
        artists: dict[int, int] = {}
        for _ in range(1 + rng.poisson(max(shape.sessions_mean * activity - 1, 0.0))):
            if now >= end:
                break
            last: int | None = None
            for _ in range(1 + rng.poisson(shape.session_len_mean - 1)):
                item: int | None = None
                if plays and rng.random() < shape.replay_rate:
                    keys = np.fromiter(plays, dtype=np.int64)
                    counts = np.fromiter(plays.values(), dtype=np.float64)
                    item = int(keys[rng.choice(len(keys), p=counts / counts.sum())])
                elif last is not None and nxt[last] >= 0 and rng.random() < shape.album_rate:
                    item = int(nxt[last])
                elif artists and rng.random() < shape.artist_rate:
                    keys = np.fromiter(artists, dtype=np.int64)
                    counts = np.fromiter(artists.values(), dtype=np.float64)
                    item = pick(
                        by_artist[int(keys[rng.choice(len(keys), p=counts / counts.sum())])], now
                    )
                if item is None:
                    stray = rng.random() < shape.stray_rate
                    n = len(GENRES)
                    item = pick(by_genre[rng.integers(n) if stray else rng.choice(n, p=taste)], now)
                if item is None:
                    continue
                rows.append((user, f"t{item}", "play", now))
                plays[item] = plays.get(item, 0) + 1
                a = int(artist_of[item])
                artists[a] = artists.get(a, 0) + 1
                last = item
                now += rng.uniform(150, 330)  # a track's length
            now += rng.exponential(7 * DAY / activity)
    start = pd.Timestamp("2025-01-01", tz="UTC").timestamp()
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "timestamp"])
    events = events[events["timestamp"] < end]
    events["timestamp"] = (events["timestamp"] + start).round().astype("int64")
    events = events.sort_values("timestamp", kind="stable").reset_index(drop=True)
    items = pd.DataFrame(
        {
            "item_id": [f"t{i}" for i in range(len(artist_of))],
            "title": track_title,
            "categories": [GENRES[g] for g in genre],
            "artist": [artist_name[a] for a in artist_of],
            "album": track_album,
            "created_at": (released + start).round().astype("int64"),
        }
    )
    return events, items


def write_frames(out: Path, events: pd.DataFrame, items: pd.DataFrame) -> Path:
    """Write ``events.csv`` and ``items.csv`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    events.to_csv(out / "events.csv", index=False)
    items.to_csv(out / "items.csv", index=False)
    return out


def write_shop(out: Path, shape: ShopShape = ShopShape(), seed: int = 0) -> Path:
    """The shop catalogue as ``events.csv`` and ``items.csv`` under ``out``."""
    return write_frames(out, *shop_catalogue(shape, seed))


def write_music(out: Path, shape: MusicShape = MusicShape(), seed: int = 0) -> Path:
    """The music play log as ``events.csv`` and ``items.csv`` under ``out``."""
    return write_frames(out, *music_catalogue(shape, seed))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", choices=("shop", "music"), default="shop")
    ap.add_argument("--out", type=Path, default=None, help="default: var/datasets/<kind>")
    ap.add_argument("--users", type=int, default=None, help="default: the kind's shape")
    ap.add_argument("--items", type=int, default=ShopShape.items, help="shop only")
    ap.add_argument("--artists", type=int, default=MusicShape.artists, help="music only")
    ap.add_argument("--days", type=int, default=None, help="default: the kind's shape")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = args.out or Path("var/datasets") / args.kind
    if args.kind == "shop":
        shop = ShopShape(
            users=args.users or ShopShape.users, items=args.items, days=args.days or ShopShape.days
        )
        write_shop(out, shop, args.seed)
    else:
        music = MusicShape(
            users=args.users or MusicShape.users,
            artists=args.artists,
            days=args.days or MusicShape.days,
        )
        write_music(out, music, args.seed)
    events = pd.read_csv(out / "events.csv")
    n_items = len(pd.read_csv(out / "items.csv", usecols=["item_id"]))
    print(f"{out}: {len(events):,} events, {events['user_id'].nunique():,} users, "
          f"{events['item_id'].nunique():,} items touched of {n_items:,}; "
          f"{events['event_type'].value_counts().to_dict()}")  # fmt: skip


if __name__ == "__main__":
    main()
