"""RankItems with filters, the repeat policy and business rules, on in-memory Milvus and
Triton: applied as Recommend applies them, the candidates kept out reported."""

from __future__ import annotations

from typing import Any

from services.deadline import Deadline
from services.recommend.context import Filters, RequestContext, Rules
from tests.services.recommend.test_pipeline import FEATURES_UP, _pipeline, _world

# i0..i11: odd ids are in category A, even ones in B; the user u1 has seen i0..i4
CANDIDATES = [f"i{i}" for i in range(12)]


def _rank(filters: Filters | None = None, rules: Rules | None = None) -> tuple[list[str], Any]:
    store, triton = _world()
    pipe = _pipeline(store, triton, FEATURES_UP)
    result, unknown = pipe.rank_items(
        "u1",
        [*CANDIDATES, "nope"],
        Deadline.after(5),
        filters=filters,
        rules=rules,
        request=RequestContext(surface="home", device="web"),
    )
    assert unknown == ["nope"]
    return [c.item_id for c in result.items], result


def test_without_rules_every_candidate_comes_back_seen_ones_too() -> None:
    ids, result = _rank()
    assert sorted(ids) == sorted(CANDIDATES) and result.left_out == [] and result.ranked


def test_filters_and_a_repeat_policy_leave_candidates_out_and_say_which() -> None:
    ids, result = _rank(Filters(exclude=frozenset({"i11"}), exclude_categories=frozenset({"A"})))
    assert sorted(ids) == ["i0", "i10", "i2", "i4", "i6", "i8"]
    assert result.left_out == ["i1", "i3", "i5", "i7", "i9", "i11"]
    # seen candidates (i0..i4) stay only in the policy's categories (A: the odd ones)
    ids, result = _rank(rules=Rules(allow_seen_categories=frozenset({"A"})))
    assert result.left_out == ["i0", "i2", "i4"] and "i1" in ids and "i3" in ids


def test_boost_bury_and_pin_apply_as_in_recommend() -> None:
    plain, _ = _rank()
    boosted, buried = plain[-1], plain[0]
    gone = next(i for i in plain[1:-1] if i != "i6")
    rules = Rules(boost=frozenset({boosted}), bury=frozenset({buried}), pin=("i6", gone))
    ids, result = _rank(Filters(exclude=frozenset({gone})), rules)
    rest = [i for i in plain if i not in {"i6", boosted, buried, gone}]
    assert ids == ["i6", boosted, *rest, buried]  # an excluded pin is never placed
    assert result.items[0].best_source == "pinned" and result.left_out == [gone]
