"""Request validation rules and their messages."""

from __future__ import annotations

import time

import pytest

from core.config import Settings
from services.api import pb
from services.api import validation as v

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


# --- limits in UTF-8 bytes (as Milvus counts them), patterns anchored ------------------------
@pytest.mark.parametrize(
    "bad",
    [
        "user\n",  # "$" would have matched before the trailing newline
        "x" * 128 + "\n",  # 129 bytes Milvus refuses
        "\nuser",
        "us\ter",
        "user\x00",
        "user\r",
        "\x7f",
        "ü" * 64,  # 128 bytes but not ASCII
    ],
)
def test_ids_with_newlines_or_control_characters_are_rejected(bad: str) -> None:
    with pytest.raises(v.InvalidArgument, match=r"malformed.*bytes"):
        v.check_id(bad, "user_id")


def test_id_limit_comes_from_the_schema() -> None:
    from core.milvus_schema import ID_MAX_LENGTH

    assert v.check_id("x" * ID_MAX_LENGTH, "item_id")
    with pytest.raises(v.InvalidArgument, match=f"1-{ID_MAX_LENGTH} bytes"):
        v.check_id("x" * (ID_MAX_LENGTH + 1), "item_id")


@pytest.mark.parametrize("char", ["é", "漢", "😀"])  # 2, 3 and 4 bytes
def test_title_limit_is_in_bytes(char: str) -> None:
    from core.milvus_schema import TITLE_MAX_LENGTH

    fits = char * (TITLE_MAX_LENGTH // len(char.encode()))
    fits += "x" * (TITLE_MAX_LENGTH - len(fits.encode()))  # exactly at the limit
    assert len(fits.encode()) == TITLE_MAX_LENGTH
    v.check_item(pb.Item(item_id="i", title=fits), 0)
    with pytest.raises(
        v.InvalidArgument, match=f"items\\[3\\].title: at most {TITLE_MAX_LENGTH} bytes"
    ):
        v.check_item(pb.Item(item_id="i", title=fits + "x"), 3)  # one byte over
    with pytest.raises(v.InvalidArgument, match="title"):
        v.check_item(pb.Item(item_id="i", title=char * TITLE_MAX_LENGTH), 0)  # chars fit, bytes not


def test_category_limit_is_in_bytes() -> None:
    from core.milvus_schema import CATEGORY_MAX_LENGTH, MAX_CATEGORIES

    at_limit = "é" * (CATEGORY_MAX_LENGTH // 2)
    assert v.check_categories([at_limit] * MAX_CATEGORIES) == [at_limit] * MAX_CATEGORIES
    for bad in (at_limit + "x", "漢" * (CATEGORY_MAX_LENGTH // 3 + 1)):
        with pytest.raises(v.InvalidArgument, match=f"1-{CATEGORY_MAX_LENGTH} bytes"):
            v.check_categories([bad])
    with pytest.raises(
        v.InvalidArgument, match=f"items\\[0\\].categories: at most {MAX_CATEGORIES}"
    ):
        v.check_item(pb.Item(item_id="i", title="T", categories=["c"] * (MAX_CATEGORIES + 1)), 0)
    with pytest.raises(v.InvalidArgument, match=r"items\[0\]\.categories"):
        v.check_item(pb.Item(item_id="i", title="T", categories=[at_limit + "é"]), 0)


def test_description_limit_is_in_bytes() -> None:
    limit = v.MAX_DESCRIPTION_BYTES
    v.check_item(pb.Item(item_id="i", title="T", description="é" * (limit // 2)), 0)
    with pytest.raises(v.InvalidArgument, match=f"description: at most {limit} bytes"):
        v.check_item(pb.Item(item_id="i", title="T", description="é" * (limit // 2) + "x"), 0)


def test_idempotency_key_limit_is_in_bytes() -> None:
    event = pb.Event(user_id="u", item_id="i", event_type=pb.EVENT_TYPE_CLICK)
    event.idempotency_key = "é" * 64  # 128 bytes
    v.check_events([event], 10)
    event.idempotency_key = "é" * 65
    with pytest.raises(v.InvalidArgument, match="idempotency_key: at most 128 bytes"):
        v.check_events([event], 10)


def _refused(call: object, *args: object) -> v.InvalidArgument:
    with pytest.raises(v.InvalidArgument) as excinfo:
        call(*args)  # type: ignore[operator]
    return excinfo.value


def test_errors_name_their_field_and_reason() -> None:
    err = _refused(v.check_k, -1, SETTINGS)
    assert (err.field, err.reason) == ("k", "OUT_OF_RANGE")
    err = _refused(v.check_excludes, ["ok", "not ok"])
    assert (err.field, err.reason) == ("exclude_item_ids[1]", "MALFORMED_ID")
    err = _refused(v.check_event, pb.Event(user_id="u", item_id="i"), 3)
    assert (err.field, err.reason) == ("events[3].event_type", "FIELD_REQUIRED")
    bad_id = pb.Event(
        user_id="u", item_id="i", event_type=pb.EVENT_TYPE_CLICK, recommendation_id="a b"
    )
    assert _refused(v.check_event, bad_id, 0).field == "events[0].recommendation_id"


def test_a_visitor_is_a_user_or_an_anonymous_session() -> None:
    v.check_visitor("u", "", "user_id", "context.session_id")
    v.check_visitor("", "s-1", "user_id", "context.session_id")
    err = _refused(v.check_visitor, "u", "s-1", "user_id", "context.session_id")
    assert (err.field, err.reason) == ("context.session_id", "CONFLICTING_FIELDS")
    assert _refused(v.check_visitor, "", "", "user_id", "context.session_id").field == "user_id"
    session_event = pb.Event(session_id="s-1", item_id="i", event_type=pb.EVENT_TYPE_VIEW)
    v.check_event(session_event, 0)
    context = pb.RequestContext(surface="home", device="bad device")
    assert _refused(v.check_context, context).field == "context.device"


def test_rules_filters_and_repeat_policy() -> None:
    rules = pb.BusinessRules(boost_item_ids=["a"], bury_item_ids=["b"], pin_item_ids=["c", "c"])
    assert v.check_business_rules(rules) == (frozenset({"a"}), frozenset({"b"}), ("c",))
    clash = pb.BusinessRules(boost_item_ids=["a"], bury_item_ids=["a"])
    assert _refused(v.check_business_rules, clash).reason == "CONFLICTING_FIELDS"
    many = pb.BusinessRules(pin_item_ids=[f"i{n}" for n in range(v.MAX_RULE_IDS + 1)])
    err = _refused(v.check_business_rules, many)
    assert (err.field, err.reason) == ("business_rules.pin_item_ids", "TOO_MANY_ENTRIES")
    item_filter = pb.ItemFilter(exclude_categories=["Comedy"])
    item_filter.min_create_time.FromSeconds(1000)
    assert v.check_item_filter(item_filter) == (frozenset({"Comedy"}), 1000)
    assert v.check_item_filter(pb.ItemFilter()) == (frozenset(), 0)
    policy = pb.RepeatPolicy(allow_seen_categories=["Drama"])
    assert v.check_repeat_policy(policy) == (False, frozenset({"Drama"}))
