"""Stage ``diversify``: MMR over the candidates' vectors (core.fusion.mmr)."""

from __future__ import annotations

import numpy as np

from services.recommend.context import Candidate
from services.recommend.diversify import mmr


def test_mmr_zero_is_relevance_order_and_diversity_spreads() -> None:
    vecs = {"a": [1, 0], "a2": [0.99, 0.14], "b": [0, 1]}
    cands = []
    for item_id, rel in (("a", 1.0), ("a2", 0.9), ("b", 0.5)):
        c = Candidate(item_id, {"vector": np.array(vecs[item_id], dtype=np.float32)})
        c.relevance = rel
        cands.append(c)
    assert [c.item_id for c in mmr(cands, 3, 0.0)] == ["a", "a2", "b"]
    assert [c.item_id for c in mmr(cands, 2, 0.7)] == ["a", "b"]
    assert mmr([], 3, 0.5) == []


def test_exploration_gives_the_last_slots_to_new_items_the_ann_found() -> None:
    from services.recommend.diversify import explore

    now = 1000 * 86400.0

    def cand(item_id: str, pop: float, ann: int | None = None, age_days: float = 0) -> Candidate:
        row = {"popularity": pop, "created_at": now - age_days * 86400 if age_days else 0}
        return Candidate(item_id, row, {} if ann is None else {"ann": ann})

    items = [cand(f"p{i}", 5.0) for i in range(10)]
    extra = [
        cand("new_far", 0.0, ann=9),
        cand("new_near", 0.0, ann=2, age_days=10),
        cand("unliked", 0.0, ann=0, age_days=400),  # old, only negatives: not new
        cand("not_by_content", 0.0),
    ]
    out = explore(items, items + extra, 10, 0.2, now)
    # two slots: the nearest new items by ANN rank, at the end; the rest keeps its order
    assert [c.item_id for c in out] == [f"p{i}" for i in range(8)] + ["new_near", "new_far"]
    assert explore(items, items + extra, 10, 0.0, now) == items
    with_new = [*items[:9], extra[0]]  # one new item already picked: one slot left
    out = explore(with_new, items + extra, 10, 0.2, now)
    assert [c.item_id for c in out][-2:] == ["new_far", "new_near"]
    assert len(out) == 10
