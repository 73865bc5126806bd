"""The online aggregates' arithmetic and how the gateway's caches blend them (no processes;
the worker writing them to a real nats-server is in test_profile_worker.py)."""

from __future__ import annotations

from typing import cast

import pytest

from core.behaviour import DEFAULT_HALF_LIFE_DAYS
from core.config import Settings
from services.events.aggregates import (
    Delta,
    decay,
    decayed,
    half_life_s,
    merge_co_occurrence,
    merge_popularity,
)
from services.recommend.retrieve import PopularItems, interleaved
from services.vectors.store import VectorStore
from tests.services.recommend.fakes import FakeStore

DAY = 86400.0


def test_a_user_counts_once_per_item_and_pairs_with_their_recent_items() -> None:
    delta = Delta(at=1000.0)
    delta.add_user(["old"], [("a", 1000.0), ("old", 1000.0), ("b", 1000.0), ("a", 1000.0)], DAY)
    assert dict(delta.popularity) == {"a": 1.0, "b": 1.0}  # "old" and the second "a": repeats
    assert dict(delta.pairs["a"]) == {"old": 1.0, "b": 1.0}
    assert dict(delta.pairs["b"]) == {"a": 1.0, "old": 1.0}
    assert not Delta() and delta


def test_merges_decay_the_stored_scores_to_the_newest_time() -> None:
    first = Delta(at=0.0)
    first.add_user([], [("a", 0.0)], DAY)
    doc = merge_popularity({}, first, DAY, top=10)
    second = Delta(at=DAY)  # one half-life later
    second.add_user([], [("b", DAY)], DAY)
    doc = merge_popularity(doc, second, DAY, top=10)
    assert doc["at"] == DAY
    assert doc["scores"] == {"b": 1.0, "a": 0.5}
    assert merge_popularity(doc, Delta(at=DAY), DAY, top=1)["scores"] == {"b": 1.0}
    assert decay(-5.0, DAY) == 1.0  # a clock ahead of ours counts as now


def test_the_recorded_half_life_survives_merges_and_a_setting_overrides_it() -> None:
    recorded = {"half_life_s": 3 * DAY, "indexed_at": 5 * DAY, "exploration_share": 0.3}
    doc = merge_popularity(recorded, Delta(at=0.0), 3 * DAY, top=10)
    assert doc["half_life_s"] == 3 * DAY  # the indexing job's choice stays for every reader
    assert doc["indexed_at"] == 5 * DAY
    assert decayed(doc, {}, Settings(), now=0.0).exploration_share == 0.3  # so does this one
    assert decayed({}, {}, Settings(), now=0.0).exploration_share is None
    assert half_life_s(Settings(), doc) == 3 * DAY
    assert half_life_s(Settings(), {}) == DEFAULT_HALF_LIFE_DAYS * DAY  # nothing recorded
    assert half_life_s(Settings(popularity_half_life_days=1.5), doc) == 1.5 * DAY


def test_the_indexed_popularity_is_decayed_to_the_time_the_online_one_is_read() -> None:
    """Both parts are added at the same "now": the index's counts, decayed to its newest
    event, keep ``0.5 ** (age / half-life)`` of their weight weeks later."""
    doc = {"at": 20 * DAY, "scores": {"a": 1.0}, "half_life_s": 3 * DAY, "indexed_at": 14 * DAY}
    online = decayed(doc, {}, Settings(), now=23 * DAY)
    assert online.popularity == {"a": pytest.approx(0.5)}
    assert online.indexed_weight == pytest.approx(0.5**3)  # three half-lives since the index
    assert decayed({}, {}, Settings(), now=23 * DAY).indexed_weight == 1.0  # none recorded


def test_co_occurrence_keeps_the_strongest_items_and_neighbours() -> None:
    delta = Delta(at=0.0)
    for _ in range(3):
        delta.add_user(["x"], [("a", 0.0)], DAY)
    delta.add_user(["y"], [("b", 0.0)], DAY)
    doc = merge_co_occurrence({}, delta, DAY, top=2, neighbours=1)
    assert doc["pairs"] == {"a": {"x": 3.0}, "x": {"a": 3.0}}
    again = merge_co_occurrence(doc, delta, DAY, top=2, neighbours=1)
    assert again["pairs"] == {"a": {"x": 6.0}, "x": {"a": 6.0}}


def test_online_popularity_lifts_an_item_into_the_cached_list() -> None:
    items = [
        {"item_id": i, "title": i, "categories": ["A"], "popularity": p, "created_at": 0}
        for i, p in (("a", 9.0), ("b", 5.0), ("c", 0.0))
    ]
    cache = PopularItems(size=2)
    assert cache.refresh(cast(VectorStore, FakeStore(items)))
    assert [r["item_id"] for r in cache.top(5)] == ["a", "b"]
    cache.set_online({"c": 6.0, "unknown": 99.0}, {"a": ["c"]})  # not in the catalogue: skipped
    assert [r["item_id"] for r in cache.top(5)] == ["a", "c"]
    assert list(cache.neighbours("a")) == ["c"] and list(cache.neighbours("b")) == []
    assert cache.clock().top_popularity == 9.0  # the ranker's reference stays the catalogue's
    cache.set_online({"c": 3.0}, {}, indexed_weight=0.25)  # the index is two half-lives old
    assert [r["item_id"] for r in cache.top(5)] == ["c", "a"]  # 3 > 9 / 4 > 5 / 4


@pytest.mark.parametrize(
    ("first", "second", "out"),
    [
        (["a", "b", "c"], ["x", "a"], ["a", "x", "b", "c"]),
        ([], ["x"], ["x"]),
        (["a"], [], ["a"]),
    ],
)
def test_neighbour_lists_are_taken_in_turns(
    first: list[str], second: list[str], out: list[str]
) -> None:
    assert interleaved(first, second) == out
