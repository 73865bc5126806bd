"""Request validation rules and their messages."""

from __future__ import annotations

import time

import pytest

from core.config import Settings
from services.api import pb
from services.gateway import validation as v

SETTINGS = Settings(max_k=50, default_k=10)


@pytest.mark.parametrize("good", ["1", "user-42", "a.b:c_d", "x" * 128])
def test_ids_accepted(good: str) -> None:
    assert v.check_id(good, "user_id") == good


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        ("", "required"),
        ("a b", "malformed"),
        ("x" * 129, "malformed"),
        ("é", "malformed"),
        ("a/b", "malformed"),
        ('a"b', "malformed"),
    ],
)
def test_ids_rejected(bad: str, fragment: str) -> None:
    with pytest.raises(v.InvalidArgument, match=fragment):
        v.check_id(bad, "user_id")


def test_k_bounds() -> None:
    assert v.check_k(0, SETTINGS) == 10
    assert v.check_k(50, SETTINGS) == 50
    for bad in (-1, 51, 2**31 - 1):
        with pytest.raises(v.InvalidArgument, match="between 1 and 50"):
            v.check_k(bad, SETTINGS)


def test_categories_and_excludes() -> None:
    assert v.check_categories([" Drama "]) == ["Drama"]
    for bad in ([""], ["x" * 65], ["a\nb"], ["c"] * 33):
        with pytest.raises(v.InvalidArgument):
            v.check_categories(bad)
    with pytest.raises(v.InvalidArgument, match="at most 1000"):
        v.check_excludes(["a"] * 1001)


def test_diversity() -> None:
    assert v.check_diversity(pb.RecommendRequest()) is None
    assert v.check_diversity(pb.RecommendRequest(diversity=0.5)) == 0.5
    for bad in (-0.1, 1.1, float("nan")):
        with pytest.raises(v.InvalidArgument, match="diversity"):
            v.check_diversity(pb.RecommendRequest(diversity=bad))


def test_events() -> None:
    ok = pb.Event(user_id="u", item_id="i", event_type=pb.EVENT_TYPE_RATING, value=4.5)
    v.check_events([ok], 10)
    cases = [
        (pb.Event(user_id="u", item_id="i"), "event_type must be set"),
        (pb.Event(user_id="u", item_id="i", event_type=pb.EVENT_TYPE_RATING, value=7), "rating"),
        (pb.Event(user_id="u", item_id="i", event_type=99), "not a known EventType"),  # type: ignore[arg-type]
        (
            pb.Event(user_id="", item_id="i", event_type=pb.EVENT_TYPE_CLICK),
            "events\\[0\\].user_id",
        ),
    ]
    for event, fragment in cases:
        with pytest.raises(v.InvalidArgument, match=fragment):
            v.check_events([event], 10)
    future = pb.Event(user_id="u", item_id="i", event_type=pb.EVENT_TYPE_CLICK)
    future.event_time.FromSeconds(int(time.time()) + 3 * 24 * 3600)
    with pytest.raises(v.InvalidArgument, match="event_time"):
        v.check_events([future], 10)
    with pytest.raises(v.InvalidArgument, match="at most 10"):
        v.check_events([ok] * 11, 10)
    with pytest.raises(v.InvalidArgument, match="must not be empty"):
        v.check_events([], 10)


def test_items() -> None:
    v.check_item(pb.Item(item_id="i", title="T", categories=["A"]), 0)
    with pytest.raises(v.InvalidArgument, match="title is required"):
        v.check_item(pb.Item(item_id="i", title="  "), 0)
    with pytest.raises(v.InvalidArgument, match="description"):
        v.check_item(pb.Item(item_id="i", title="T", description="x" * 10_001), 0)
