"""The API's additions against the real gateway (tritonserver, Milvus Lite, NATS): the
recommendation id, structured errors, item reads, pages and deletion, and RankItems."""

from __future__ import annotations

import re
import uuid

import pytest
from recsys_client import InvalidArgumentError, NotFoundError, RecommenderClient, RecsysError

from core.rows import item_row
from ops.stack import LocalStack
from services.api import pb
from services.vectors.store import VectorStore

pytestmark = pytest.mark.integration


def _violation(err: RecsysError) -> tuple[str, str | None, str | None]:
    (field, _), *_ = err.field_violations
    return field, err.reason, err.domain


def test_every_response_has_its_own_recommendation_id_accepted_on_events(
    client: RecommenderClient,
) -> None:
    ids = {client.recommend("1", k=3).recommendation_id for _ in range(3)}
    ids.add(client.recommend("someone-new", k=3).recommendation_id)  # cold start too
    assert len(ids) == 4 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    shown = client.recommend("rid-clicker", k=3)
    click = pb.Event(
        user_id="rid-clicker",
        item_id=shown.items[0].item.item_id,
        event_type=pb.EVENT_TYPE_CLICK,
        recommendation_id=shown.recommendation_id,
    )
    assert client.ingest([click]).accepted_count == 1
    bad = pb.Event(
        user_id="rid-clicker",
        item_id="1",
        event_type=pb.EVENT_TYPE_CLICK,
        recommendation_id="no way",
    )
    with pytest.raises(InvalidArgumentError) as excinfo:
        client.ingest([bad])
    assert _violation(excinfo.value) == ("events[0].recommendation_id", "MALFORMED_ID", "recsys.v1")


def test_errors_carry_a_reason_and_the_field(client: RecommenderClient) -> None:
    untyped = pb.Event(user_id="1", item_id="1")
    cases = [
        (lambda: client.recommend("1", k=-1), ("k", "OUT_OF_RANGE")),
        (lambda: client.recommend("", k=5), ("user_id", "FIELD_REQUIRED")),
        (
            lambda: client.recommend("1", exclude=["ok", "no!"]),
            ("exclude_item_ids[1]", "MALFORMED_ID"),
        ),
        (lambda: client.recommend("1", diversity=2.0), ("diversity", "OUT_OF_RANGE")),
        (lambda: client.ingest([untyped]), ("events[0].event_type", "FIELD_REQUIRED")),
        (lambda: client.upsert_items([]), ("items", "FIELD_REQUIRED")),
    ]
    for call, (field, reason) in cases:
        with pytest.raises(InvalidArgumentError) as excinfo:
            call()
        assert _violation(excinfo.value) == (field, reason, "recsys.v1"), field
    with pytest.raises(NotFoundError) as missing:
        client.similar("no-such-item")
    assert (missing.value.reason, missing.value.domain) == ("ITEM_NOT_FOUND", "recsys.v1")
    with pytest.raises(NotFoundError) as nobody:
        client.profile("nobody-at-all")
    assert nobody.value.reason == "USER_NOT_FOUND"


def test_items_are_read_listed_in_pages_and_deleted(
    client: RecommenderClient, store: VectorStore
) -> None:
    item = client.get_item("1")
    assert item.item_id == "1" and item.title.startswith("Toy Story")
    with pytest.raises(NotFoundError) as excinfo:
        client.get_item("no-such-item")
    assert excinfo.value.reason == "ITEM_NOT_FOUND"
    first = client.list_items(page_size=7)
    ids = [i.item_id for i in first.items]
    assert len(ids) == 7 and ids == sorted(ids) and first.next_page_token
    second = client.list_items(page_size=7, page_token=first.next_page_token)
    assert min(i.item_id for i in second.items) > ids[-1]
    every = [i.item_id for i in client.iter_items(page_size=1000)]
    assert every == sorted(set(every)) and len(every) == store.count(store.items.name)
    for token, reason in (("garbage", "INVALID_PAGE_TOKEN"), (first.next_page_token + "x", None)):
        with pytest.raises(InvalidArgumentError) as bad:
            client.list_items(page_token=token)
        assert bad.value.field_violations[0][0] == "page_token"
        assert reason is None or bad.value.reason == reason

    # Delete an item cold-start users are shown, then put its exact row back.
    cold = [s.item.item_id for s in client.recommend("cold-visitor", k=20).items]
    victim = cold[-1]
    row = store.get_items([victim], 10, with_vectors=True, with_neighbours=True)[victim]
    try:
        assert client.delete_item(victim).existed
        with pytest.raises(NotFoundError):
            client.get_item(victim)
        assert victim not in {s.item.item_id for s in client.recommend("cold-visitor", k=20).items}
        assert victim not in {i.item_id for i in client.iter_items(page_size=1000)}
        assert not client.delete_item(victim).existed
    finally:
        restored = item_row(
            victim,
            row["title"],
            row["categories"],
            row["text"],
            popularity=row["popularity"],
            created_at=row["created_at"],
            co_items=row["co_items"],
            vector=row["vector"],
        )
        store.upsert_items([restored])
    assert client.get_item(victim).title == row["title"]


def test_rank_items_orders_the_callers_candidates(client: RecommenderClient) -> None:
    shown = [s.item.item_id for s in client.recommend("1", k=10, diversity=0.0).items]
    candidates = [*reversed(shown), "1", shown[0], "no-such-item"]  # seen, repeated, unknown
    ranked = client.rank_items("1", candidates)
    got = [s.item.item_id for s in ranked.items]
    assert sorted(got) == sorted({*shown, "1"}) and list(ranked.unknown_item_ids) == [
        "no-such-item"
    ]
    assert not ranked.degraded and ranked.model_version == "1"
    assert re.fullmatch(r"[0-9a-f]{32}", ranked.recommendation_id)
    # the feature ranker scored every candidate on Triton, and the order is its order
    assert all(0.0 < s.click_probability < 1.0 for s in ranked.items)
    scores = [s.score for s in ranked.items]
    assert scores == sorted(scores, reverse=True)
    assert [s.click_probability for s in ranked.items] == scores
    # a cold-start user has no history to rank on: every candidate still comes back
    cold = client.rank_items("cold-visitor", shown)
    assert sorted(s.item.item_id for s in cold.items) == sorted(shown)
    for ids, reason in (([], "FIELD_REQUIRED"), (["x"] * 501, "TOO_MANY_ENTRIES")):
        with pytest.raises(InvalidArgumentError) as excinfo:
            client.rank_items("1", ids)
        assert _violation(excinfo.value) == ("item_ids", reason, "recsys.v1")


def test_cli_lists_gets_and_ranks(stack: LocalStack, capsys: pytest.CaptureFixture[str]) -> None:
    from recsys_client.cli import main

    base = ["--target", stack.gateway_target]
    assert main([*base, "get-item", "--item", "1"]) == 0
    assert "Toy Story" in capsys.readouterr().out
    assert main([*base, "list-items", "--page-size", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 4 and "next page: --page-token " in out
    assert main([*base, "rank", "--user", "1", "--items", "1,2,3,no-such-item"]) == 0
    out = capsys.readouterr().out
    assert "recommendation id " in out and "not in the catalogue: no-such-item" in out
    assert main([*base, "get-item", "--item", "no-such-item"]) == 1
    assert "NOT_FOUND [ITEM_NOT_FOUND]" in capsys.readouterr().err


def test_more_like_this_is_anchored_on_the_current_item(
    client: RecommenderClient, store: VectorStore
) -> None:
    page = pb.RequestContext(surface="item_page", device="web", current_item_id="1")
    reply = client.recommend("1", k=10, diversity=0.0, context=page)
    ids = [s.item.item_id for s in reply.items]
    assert len(ids) == 10 and "1" not in ids and not reply.degraded
    toy_story = store.get_items(["1"], 10, with_vectors=True, with_neighbours=True)["1"]
    neighbours = {h["item_id"] for h in store.search_items(toy_story["vector"], 200, 10)}
    assert set(ids) <= neighbours | set(toy_story["co_items"])
    title = toy_story["title"]
    assert {s.source for s in reply.items} <= {"ann", "co_occurrence"}
    for s in reply.items:  # a new item is explained as new, whatever found it
        if not s.reason.startswith("new in "):
            assert s.reason in (f"similar to {title}", f"people who liked {title} also liked this")
    assert ids != [s.item.item_id for s in client.recommend("1", k=10, diversity=0.0).items]
    with pytest.raises(NotFoundError) as excinfo:
        client.recommend("1", context=pb.RequestContext(current_item_id="no-such-item"))
    assert excinfo.value.reason == "ITEM_NOT_FOUND"
    with pytest.raises(InvalidArgumentError) as bad:
        client.recommend("1", context=pb.RequestContext(device="bad device"))
    assert _violation(bad.value) == ("context.device", "MALFORMED_ID", "recsys.v1")


def test_anonymous_session_has_a_history_but_no_user_row(
    client: RecommenderClient, store: VectorStore, stack: LocalStack
) -> None:
    import asyncio

    import nats

    session = f"visitor-{uuid.uuid4().hex[:12]}"
    context = pb.RequestContext(session_id=session)
    first = client.recommend("", k=10, context=context)
    assert first.cold_start and first.items and not first.degraded
    watched = ["1", "2", "3", "4", "5"]
    events = [
        pb.Event(session_id=session, item_id=i, event_type=pb.EVENT_TYPE_CLICK) for i in watched
    ]
    assert client.ingest(events).accepted_count == 5
    warm = client.recommend("", k=10, context=context)
    assert not warm.cold_start and not warm.degraded
    assert not set(watched) & {s.item.item_id for s in warm.items}
    # personal sources found them too (a popular item the ANN found is explained by it)
    assert any(s.reason.startswith(("similar to ", "people who liked ")) for s in warm.items)
    assert [s.item.item_id for s in warm.items] != [s.item.item_id for s in first.items]
    assert store.get_user(session, 10) is None and store.get_user("", 10) is None
    with pytest.raises(NotFoundError):
        client.profile(session)
    with pytest.raises(InvalidArgumentError) as both:
        client.recommend("1", context=context)
    assert _violation(both.value) == ("context.session_id", "CONFLICTING_FIELDS", "recsys.v1")
    with pytest.raises(InvalidArgumentError) as neither:
        client.ingest([pb.Event(item_id="1", event_type=pb.EVENT_TYPE_CLICK)])
    assert _violation(neither.value) == ("events[0].user_id", "FIELD_REQUIRED", "recsys.v1")

    async def bucket_ttl() -> float:  # where a session lives, and for how long
        nc = await nats.connect(stack.settings.nats_urls)
        try:
            kv = await nc.jetstream().key_value(stack.settings.sessions_bucket)
            return float((await kv.status()).ttl or 0)
        finally:
            await nc.close()

    assert asyncio.run(bucket_ttl()) == pytest.approx(stack.settings.session_ttl_s)


def _ids(reply: pb.RecommendResponse) -> list[str]:
    return [s.item.item_id for s in reply.items]


def test_repeat_policy_lets_seen_items_come_back(
    client: RecommenderClient, store: VectorStore
) -> None:
    user = store.get_user("1", 10, with_vector=False)
    assert user is not None
    seen = {*user["recent_items"], *user["seen_items"]}
    assert not seen & set(_ids(client.recommend("1", k=50)))
    again = _ids(client.recommend("1", k=50, repeat_policy=pb.RepeatPolicy(allow_seen=True)))
    assert seen & set(again)
    rows = store.get_items(sorted(seen), 10)
    counts: dict[str, int] = {}
    for row in rows.values():
        for category in row["categories"]:
            counts[category] = counts.get(category, 0) + 1
    category = max(counts, key=lambda c: counts[c])
    policy = pb.RepeatPolicy(allow_seen_categories=[category])
    some = _ids(client.recommend("1", k=50, repeat_policy=policy))
    back = seen & set(some)
    assert back and all(category in rows[i]["categories"] for i in back)


def test_item_filter_applies_to_every_source(client: RecommenderClient) -> None:
    no_comedy = pb.ItemFilter(exclude_categories=["Comedy"])
    for user in ("1", "cold-visitor"):
        reply = client.recommend(user, k=30, item_filter=no_comedy)
        # filtered after retrieval: of its 50 candidates (rank_candidates) fewer may be left
        assert len(reply.items) >= 20
        assert all("Comedy" not in s.item.categories for s in reply.items)
    times = sorted(s.item.create_time.seconds for s in client.recommend("1", k=50).items)
    cut = times[len(times) // 2]
    recent = pb.ItemFilter()
    recent.min_create_time.FromSeconds(cut)
    reply = client.recommend("1", k=20, item_filter=recent)
    assert reply.items and all(s.item.create_time.seconds >= cut for s in reply.items)


def test_business_rules_boost_bury_and_pin(client: RecommenderClient, store: VectorStore) -> None:
    wide = _ids(client.recommend("1", k=40, diversity=0.0))
    base = wide[:10]
    boosted = [base[6], wide[30]]  # one shown anyway, one that was not
    rules = pb.BusinessRules(boost_item_ids=boosted, bury_item_ids=[base[0]])
    ids = _ids(client.recommend("1", k=10, diversity=0.0, business_rules=rules))
    assert ids[:2] == boosted and base[0] not in ids
    user = store.get_user("1", 10, with_vector=False)
    assert user is not None
    seen = {*user["recent_items"], *user["seen_items"]}
    fresh = next(i.item_id for i in client.iter_items(500) if i.item_id not in {*wide, *seen})
    pins = [fresh, base[3], sorted(seen)[0]]  # the seen one is not allowed back
    reply = client.recommend(
        "1", k=10, diversity=0.0, business_rules=pb.BusinessRules(pin_item_ids=pins)
    )
    assert _ids(reply)[:2] == pins[:2] and pins[2] not in _ids(reply) and len(reply.items) == 10
    assert [(s.source, s.reason) for s in reply.items[:2]] == [("pinned", "featured")] * 2
    excluded = client.recommend(
        "1", exclude=[fresh], business_rules=pb.BusinessRules(pin_item_ids=[fresh])
    )
    assert fresh not in _ids(excluded)
    conflict = pb.BusinessRules(boost_item_ids=["5"], bury_item_ids=["5"])
    with pytest.raises(InvalidArgumentError) as excinfo:
        client.recommend("1", business_rules=conflict)
    assert excinfo.value.reason == "CONFLICTING_FIELDS"


def test_rank_items_takes_context_filters_repeat_policy_and_rules(
    client: RecommenderClient, store: VectorStore
) -> None:
    shown = _ids(client.recommend("1", k=10, diversity=0.0))
    user = store.get_user("1", 10, with_vector=False)
    assert user is not None
    seen = sorted({*user["recent_items"], *user["seen_items"]})[:3]
    candidates = [*shown, *seen]
    rows = store.get_items(candidates, 10)
    home = pb.RequestContext(surface="home", device="ios")
    plain = client.rank_items("1", candidates, context=home)
    assert sorted(_ids(plain)) == sorted(candidates) and not plain.filtered_item_ids
    # attribute filters and a repeat policy naming categories leave candidates out, named
    category = rows[shown[0]]["categories"][0]
    no_cat = pb.ItemFilter(exclude_categories=[category])
    filtered = client.rank_items("1", candidates, context=home, item_filter=no_cat)
    out = [i for i in candidates if category in rows[i]["categories"]]
    assert list(filtered.filtered_item_ids) == out and set(_ids(filtered)).isdisjoint(out)
    kept = rows[seen[0]]["categories"][0]
    policy = pb.RepeatPolicy(allow_seen_categories=[kept])
    repeat = client.rank_items("1", candidates, context=home, repeat_policy=policy)
    assert list(repeat.filtered_item_ids) == [i for i in seen if kept not in rows[i]["categories"]]
    # boost, bury and pin as in Recommend: a pinned catalogue item first, every candidate kept
    order = _ids(plain)
    fresh = next(i.item_id for i in client.iter_items(500) if i.item_id not in candidates)
    rules = pb.BusinessRules(
        boost_item_ids=[order[-1]], bury_item_ids=[order[0]], pin_item_ids=[fresh]
    )
    ranked = _ids(client.rank_items("1", candidates, context=home, business_rules=rules))
    assert ranked[:2] == [fresh, order[-1]] and ranked[-1] == order[0]
    assert sorted(ranked) == sorted([*candidates, fresh])
    with pytest.raises(InvalidArgumentError) as excinfo:
        client.rank_items("1", candidates, context=pb.RequestContext(current_item_id="1"))
    assert _violation(excinfo.value) == (
        "context.current_item_id",
        "FIELD_NOT_SUPPORTED",
        "recsys.v1",
    )
