"""Hypothesis strategies for every request message of ``recsys.v1.RecommenderService``.

Values mix the plausible (ids from the indexed MovieLens slice, small k) with the hostile:
unicode and control characters, over-long and huge strings, negative and extreme integers,
NaN and infinities, enum numbers nobody defined, timestamps far outside any calendar and
repeated fields past every limit. Surrogate code points are left out: protobuf cannot even
serialise them, so they never reach a server.
"""

from __future__ import annotations

from typing import TypeVar

from hypothesis import strategies as st

from services.api import pb
from tests.fuzz_text import CHARS

T = TypeVar("T")
INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
VALID_ID = st.from_regex(r"\A[A-Za-z0-9_.:\-]{1,128}\Z")
KNOWN_ITEM = st.integers(1, 500).map(str)  # MovieLens movieIds of the indexed slice
KNOWN_USER = st.integers(1, 610).map(str)
HUGE = st.builds(lambda c, n: c * n, st.sampled_from("xé\x00🙂"), st.integers(10_000, 1_200_000))


def long_text(lo: int, hi: int) -> st.SearchStrategy[str]:
    """A character repeated ``lo..hi`` times (Hypothesis draws long strings slowly)."""
    return st.builds(lambda c, n: c * n, CHARS, st.integers(lo, hi))


text = st.one_of(
    st.text(CHARS, max_size=40),
    st.text(st.characters(max_codepoint=0x1F), max_size=10),  # control characters only
    st.text(CHARS, min_size=100, max_size=300),
    st.sampled_from(["", " ", "\t", "\n", "\x00", "\u202e", "🙂", "a" * 129, "../../etc"]),
)
ids = st.one_of(KNOWN_ITEM, KNOWN_USER, VALID_ID, text)


def rarely(rare: st.SearchStrategy[T], common: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """``rare`` about one draw in twenty, else ``common``."""
    return st.integers(0, 19).flatmap(lambda n: rare if n == 0 else common)


k = st.one_of(st.integers(-3, 260), INT32)
floats = st.floats(allow_nan=True, allow_infinity=True, width=64)


def repeated(element: st.SearchStrategy[object], limit: int) -> st.SearchStrategy[list[object]]:
    """Short lists mostly; now and then one element repeated past ``limit``."""
    return st.one_of(
        st.lists(element, max_size=6),
        st.builds(lambda e, n: [e] * n, element, st.integers(limit - 2, limit + 50)),
    )


@st.composite
def timestamps(draw: st.DrawFn) -> tuple[int, int] | None:
    if draw(st.booleans()):
        return None
    seconds = draw(st.one_of(st.integers(0, 2_000_000_000), INT64))
    return seconds, draw(st.one_of(st.just(0), INT32))


@st.composite
def events(draw: st.DrawFn) -> pb.Event:
    event = pb.Event(
        user_id=draw(ids),
        item_id=draw(ids),
        event_type=draw(st.one_of(st.integers(0, 5), INT32)),
        value=draw(st.one_of(st.floats(0, 6), floats)),
        idempotency_key=draw(st.one_of(st.just(""), text)),
    )
    ts = draw(timestamps())
    if ts is not None:
        event.event_time.seconds, event.event_time.nanos = ts
    return event


plausible_events = st.builds(
    lambda u, i, t, v: pb.Event(user_id=u, item_id=i, event_type=t, value=v),
    KNOWN_USER,
    KNOWN_ITEM,
    st.integers(1, 4),
    st.sampled_from([0.0, 0.5, 3.0, 5.0]),
)


@st.composite
def items(draw: st.DrawFn) -> pb.Item:
    item = pb.Item(
        item_id=draw(st.one_of(VALID_ID.map(lambda s: "fz-" + s[:120]), ids)),
        title=draw(st.one_of(text, long_text(500, 600))),
        categories=draw(repeated(text, 32)),
        description=draw(st.one_of(text, long_text(9_990, 10_010))),
    )
    ts = draw(timestamps())
    if ts is not None:
        item.create_time.seconds, item.create_time.nanos = ts
    return item


@st.composite
def recommend(draw: st.DrawFn) -> pb.RecommendRequest:
    request = pb.RecommendRequest(
        user_id=draw(rarely(HUGE, st.one_of(ids, st.just("")))),
        k=draw(k),
        categories=draw(repeated(text, 32)),
        exclude_item_ids=draw(repeated(ids, 1000)),
    )
    if draw(st.booleans()):
        request.diversity = draw(st.one_of(st.floats(0, 1, width=32), st.floats(width=32)))
    if draw(st.booleans()):  # surface, device, "more like this", anonymous session
        request.context.surface = draw(text)
        request.context.device = draw(text)
        request.context.current_item_id = draw(st.one_of(st.just(""), ids))
        request.context.session_id = draw(st.one_of(st.just(""), ids))
    if draw(st.booleans()):
        request.repeat_policy.allow_seen = draw(st.booleans())
        request.repeat_policy.allow_seen_categories.extend(draw(repeated(text, 32)))
        request.item_filter.exclude_categories.extend(draw(repeated(text, 32)))
        ts = draw(timestamps())
        if ts is not None:
            (
                request.item_filter.min_create_time.seconds,
                request.item_filter.min_create_time.nanos,
            ) = ts
        request.business_rules.boost_item_ids.extend(draw(repeated(ids, 100)))
        request.business_rules.bury_item_ids.extend(draw(repeated(ids, 100)))
        request.business_rules.pin_item_ids.extend(draw(repeated(ids, 100)))
    return request


similar = st.builds(
    lambda item_id, kk, cats, excl: pb.SimilarItemsRequest(
        item_id=item_id, k=kk, categories=cats, exclude_item_ids=excl
    ),
    ids,
    k,
    repeated(text, 32),
    repeated(ids, 1000),
)
profile = st.builds(lambda u: pb.GetUserProfileRequest(user_id=u), ids)
delete = st.builds(lambda u: pb.DeleteUserRequest(user_id=u), ids)
ingest = st.builds(
    lambda e: pb.IngestEventsRequest(events=e),
    st.one_of(repeated(events(), 1000), st.lists(plausible_events, min_size=1, max_size=20)),
)
stream = st.lists(
    st.builds(lambda e: pb.StreamIngestEventsRequest(events=e), repeated(events(), 1000)),
    max_size=4,
)
upsert = st.builds(lambda i: pb.UpsertItemsRequest(items=i), repeated(items(), 500))
get_item = st.builds(lambda i: pb.GetItemRequest(item_id=i), ids)
list_items = st.builds(
    lambda n, t: pb.ListItemsRequest(page_size=n, page_token=t),
    st.one_of(st.integers(-3, 1_100), INT32),
    st.one_of(st.just(""), text, st.binary(max_size=40).map(lambda b: b.hex())),
)
delete_item = st.builds(lambda i: pb.DeleteItemRequest(item_id=i), ids)


@st.composite
def rank(draw: st.DrawFn) -> pb.RankItemsRequest:
    """RankItems with Recommend's context, repeat policy, filters and rules (its own
    ``current_item_id``/``session_id`` are refused, so they are drawn too)."""
    like = draw(recommend())
    return pb.RankItemsRequest(
        user_id=draw(st.one_of(ids, st.just(""))),
        item_ids=draw(repeated(ids, 500)),
        context=like.context,
        repeat_policy=like.repeat_policy,
        item_filter=like.item_filter,
        business_rules=like.business_rules,
    )
