"""The rules stage: filters and the repeat policy on candidates, boost/bury, pins."""

from __future__ import annotations

from typing import Any, cast

from services.deadline import Deadline
from services.recommend.context import Candidate, Context, Filters, Rules
from services.recommend.rules import ApplyRules
from services.vectors.store import VectorStore
from tests.services.recommend.fakes import FakeStore, row


def _ctx(filters: Filters | None = None, rules: Rules | None = None, k: int = 3) -> Context:
    ctx = Context.begin("u", k, filters or Filters(), Deadline.after(5), rules=rules)
    ctx.history_ids = ["s1"]
    ctx.profile = {"seen_items": ["s2"]}
    return ctx


def _cands(*rows: dict[str, Any]) -> list[Candidate]:
    return [
        Candidate(r["item_id"], r, {"ann": n}, relevance=1.0 - n / 10) for n, r in enumerate(rows)
    ]


def _stage(store: FakeStore | None = None) -> ApplyRules:
    return ApplyRules(cast(VectorStore, store or FakeStore([])))


def test_admit_applies_attribute_filters_and_the_repeat_policy_per_category() -> None:
    rows = [row("a", ("A",)), row("b", ("Comedy",)), row("s1", ("A",)), row("s2", ("B",))]
    for r, created in zip(rows, (100, 300, 300, 300), strict=True):
        r["created_at"] = created
    ctx = _ctx(Filters(exclude_categories=frozenset({"Comedy"})))
    ctx.candidates = _cands(*rows)
    _stage().admit(ctx)
    assert [c.item_id for c in ctx.candidates] == ["a"]  # seen items never, by default
    ctx = _ctx(Filters(min_created_at=200), Rules(allow_seen_categories=frozenset({"B"})))
    ctx.candidates = _cands(*rows)
    _stage().admit(ctx)
    assert [c.item_id for c in ctx.candidates] == ["b", "s2"]  # a too old; s1 not in B
    assert _ctx(rules=Rules(allow_seen=True)).seen_ids() == set()
    assert _ctx().seen_ids() == {"s1", "s2"}


def test_boost_and_bury_move_whole_groups_keeping_their_order() -> None:
    ctx = _ctx(rules=Rules(boost=frozenset({"d", "c"}), bury=frozenset({"a"})))
    ctx.candidates = _cands(row("a"), row("b"), row("c"), row("d"), row("e"))
    _stage().adjust(ctx)
    order = sorted(ctx.candidates, key=lambda c: -c.relevance)
    assert [c.item_id for c in order] == ["c", "d", "b", "e", "a"]


def test_pins_come_first_unless_kept_out() -> None:
    store = FakeStore([row("p1"), row("p2", ("Comedy",)), row("s1"), row("x")])
    ctx = _ctx(
        Filters(exclude=frozenset({"x"}), exclude_categories=frozenset({"Comedy"})),
        Rules(pin=("missing", "x", "p2", "s1", "p1")),
    )
    ctx.items = _cands(row("a"), row("p1"), row("b"))
    _stage(store).pin(ctx)
    assert [c.item_id for c in ctx.items] == ["p1", "a", "b"]
    assert ctx.items[0].best_source == "pinned" and ctx.items[0].relevance > ctx.items[1].relevance
    store.down.add("get_items")
    ctx.items = _cands(row("a"))
    _stage(store).pin(ctx)
    assert [c.item_id for c in ctx.items] == ["a"] and ctx.degraded[0].startswith("milvus")
