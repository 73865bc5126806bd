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


def test_newest_first_reorders_only_the_best_content_matches() -> None:
    from core.fusion import newest_first

    inf = float("inf")
    ages = [50.0, 5.0, inf, 1.0, 20.0]  # seconds since each appeared (inf: unknown)
    by_content = [0, 1, 2, 3, 4]
    assert newest_first(by_content, ages, 1) == by_content  # the best match alone: as found
    assert newest_first(by_content, ages, 3) == [1, 0, 2, 3, 4]  # unknown age: oldest
    assert newest_first(by_content, ages, 10) == [3, 1, 4, 0, 2]
    assert newest_first([4, 2, 0], ages, 2) == [4, 2, 0]
    tie = [7.0, 7.0, 7.0]
    assert newest_first([2, 0, 1], tie, 3) == [2, 0, 1]  # equal ages keep content order


def test_slot_order_takes_found_new_items_by_content_then_the_newest_of_the_pool() -> None:
    from core.fusion import slot_order

    inf = float("inf")
    content = [0.9, 0.8, -inf, 0.7, 0.95, 0.6]  # -inf: the content match did not find it
    new = [True, True, True, True, False, True]  # 4 is no new item, whatever its match
    ages = [30.0, 10.0, 1.0, 5.0, 1.0, 2.0]
    assert slot_order(content, new, ages, 1) == [0, 1, 3, 5]  # best match first
    assert slot_order(content, new, ages, 3) == [3, 1, 0, 5]  # the newest of the best 3
    assert slot_order(content, new, ages, 10) == [5, 3, 1, 0]
    assert slot_order([], [], [], 5) == []


def test_exploration_takes_the_newest_of_the_pool_and_what_fusion_left_out() -> None:
    from services.deadline import Deadline
    from services.recommend.context import Context, Filters, Rules
    from services.recommend.diversify import ann_extras, explore

    now = 1000 * 86400.0

    def row(item_id: str, pop: float = 0.0, age_days: float = 0, cats: tuple = ()) -> dict:
        created = now - age_days * 86400 if age_days else 0
        return {"item_id": item_id, "popularity": pop, "created_at": created, "categories": cats}

    items = [Candidate(f"p{i}", row(f"p{i}", 5.0)) for i in range(10)]
    best, newer = row("best_match", age_days=60), row("newer", age_days=2)
    extra = [Candidate("best_match", best, {"ann": 1}), Candidate("newer", newer, {"ann": 5})]
    pick = [c.item_id for c in explore(items, items + extra, 10, 0.1, now, pool=1)]
    assert pick[-1] == "best_match"  # pool 1: best content match first
    pick = [c.item_id for c in explore(items, items + extra, 10, 0.1, now, pool=20)]
    assert pick[-1] == "newer"  # the newest of the pool

    ctx = Context.begin(
        "u",
        10,
        Filters(exclude_categories=frozenset({"Banned"})),
        Deadline.after(5),
        rules=Rules(bury=frozenset({"buried"})),
    )
    ctx.candidates = items
    ctx.ann_rows = [
        row("p3", 5.0),  # a candidate already
        row("left_out", age_days=3),
        row("buried", age_days=1),
        row("banned", age_days=1, cats=("Banned",)),
    ]
    extras = ann_extras(ctx)
    assert [(c.item_id, c.ranks) for c in extras] == [("left_out", {"ann": 1})]


def _mmr_by_formula(rel: np.ndarray, vectors: np.ndarray, k: int, lam: float) -> list[int]:
    """Each pick is ``argmax (1 - λ)·rel - λ·max cos`` to the picks so far (0 before the
    first), with ``rel`` min-max scaled: the definition, written out."""
    n = len(rel)
    scaled = (rel - rel.min()) / (rel.max() - rel.min()) if n > 1 else np.ones(n)
    picked: list[int] = []

    def gain(i: int) -> float:
        penalty = max((float(vectors[i] @ vectors[j]) for j in picked), default=0.0)
        return float((1 - lam) * scaled[i] - lam * penalty)

    for _ in range(min(k, n)):
        picked.append(max((i for i in range(n) if i not in picked), key=gain))
    return picked


def test_mmr_picks_what_its_formula_says() -> None:
    from core.fusion import mmr as kernel

    rng = np.random.default_rng(7)
    for trial in range(20):
        n, lam = int(rng.integers(1, 40)), float(rng.uniform(0.05, 0.95))
        vectors = rng.normal(size=(n, 8)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        rel = rng.uniform(size=n)
        assert kernel(rel, vectors, 10, lam).tolist() == _mmr_by_formula(rel, vectors, 10, lam), (
            trial
        )


def test_the_stage_takes_the_share_the_index_recorded_unless_the_setting_fixes_one() -> None:
    """``exploration_share`` unset: the catalogue's share, as the indexing job recorded it
    (read from the aggregates into the popularity cache), 0.1 before any is recorded."""
    from typing import Any, cast

    from core.config import Settings
    from services.deadline import Deadline
    from services.recommend.context import Context, Filters
    from services.recommend.diversify import Diversify
    from services.recommend.retrieve import PopularItems
    from services.vectors.store import VectorStore
    from tests.services.recommend.fakes import FakeStore

    now = 1000 * 86400.0
    rows: list[dict[str, Any]] = [
        {"item_id": f"p{i}", "popularity": 10.0 - i, "created_at": now - 400 * 86400}
        for i in range(10)
    ] + [{"item_id": f"n{i}", "popularity": 0.0, "created_at": now - i * 86400} for i in range(5)]
    popular = PopularItems(size=20)
    assert popular.refresh(
        cast(VectorStore, FakeStore([{**r, "title": "", "categories": []} for r in rows]))
    )

    def new_items(settings: Settings) -> int:
        ctx = Context.begin("u", 10, Filters(), Deadline.after(5), diversity=0.0)
        ctx.candidates = [Candidate(r["item_id"], r) for r in rows[:10]]
        ctx.candidates += [Candidate(r["item_id"], r, {"ann": n}) for n, r in enumerate(rows[10:])]
        for c, relevance in zip(ctx.candidates, range(15, 0, -1), strict=True):
            c.relevance = float(relevance)
        Diversify(settings, popular).run(ctx)
        assert len(ctx.items) == 10
        return sum(c.item_id.startswith("n") for c in ctx.items)

    assert new_items(Settings()) == 1  # nothing recorded: the default
    popular.set_exploration_share(0.3)
    assert new_items(Settings()) == 3
    assert new_items(Settings(exploration_share=0.2)) == 2
    assert new_items(Settings(exploration_share=0.0)) == 0
