"""Stage ``diversify``: the final ``k`` by maximal marginal relevance over item vectors,
then exploration slots for new items.

λ comes from the request, else the experiment variant, else the settings; without a vector
for every candidate it falls back to plain relevance order (λ = 0). Exploration: an item
nobody has interacted with yet has no popularity and no co-occurrence, so no ranker trained
on behaviour puts it in a top 10; a share of the slots (the last ones: the catalogue's
share, chosen and recorded by the indexing job, :mod:`core.exploration`, or the setting
``exploration_share``) go to the newest of the ``exploration_pool`` new items the content
ANN matched best (its whole list, also the items fusion left out of the candidates), so
new items get seen and their behaviour can start (what it buys and costs:
training/evaluation/FINDINGS.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from core import fusion
from core.config import Settings
from core.ranking_features import is_new
from services.recommend.context import Candidate, Context, Stage
from services.recommend.retrieve import PopularItems
from services.recommend.rules import allowed


def mmr(candidates: Sequence[Candidate], k: int, diversity: float) -> list[Candidate]:
    """The final ``k`` by maximal marginal relevance (:func:`core.fusion.mmr`) over the item
    vectors; with λ = 0 this is plain relevance order."""
    if not candidates:
        return []
    pool = list(candidates)
    relevance = np.array([c.relevance for c in pool], dtype=np.float64)
    vectors = (
        np.asarray([c.row["vector"] for c in pool], dtype=np.float32) if diversity > 0 else None
    )
    return [pool[i] for i in fusion.mmr(relevance, vectors, k, diversity)]


class Diversify(Stage):
    """Sets ``items``: the ``k`` candidates MMR picks, in pick order."""

    name = "diversify"

    def __init__(self, settings: Settings, popular: PopularItems) -> None:
        self.settings = settings
        self.popular = popular

    def run(self, ctx: Context) -> None:
        lam = ctx.diversity if ctx.diversity is not None else ctx.variant.mmr_lambda
        lam = self.settings.mmr_lambda if lam is None else lam
        with_vectors = all("vector" in c.row for c in ctx.candidates)
        items = mmr(ctx.candidates, ctx.k, lam if with_vectors else 0.0)
        share = self.settings.exploration_share
        share = self.popular.exploration_share() if share is None else share
        now = self.popular.clock().now
        pool = ctx.candidates + ann_extras(ctx) if share > 0 else ctx.candidates
        ctx.items = explore(items, pool, ctx.k, share, now, self.settings.exploration_pool)


def ann_extras(ctx: Context) -> list[Candidate]:
    """The ANN's hits that fusion left out of the candidates, as candidates of that source
    alone, less what the request's rules keep out or bury: exploration may take them."""
    have = {c.item_id for c in ctx.candidates}
    seen = ctx.interacted_ids()
    return [
        Candidate(row["item_id"], row, {"ann": rank})
        for rank, row in enumerate(ctx.ann_rows)
        if row["item_id"] not in have
        and row["item_id"] not in ctx.rules.bury
        and allowed(ctx, row, seen)
    ]


def explore(
    items: list[Candidate],
    candidates: Sequence[Candidate],
    k: int,
    share: float,
    now: float,
    pool: int = 1,
) -> list[Candidate]:
    """``items`` with exploration slots (:func:`core.fusion.explore`) for the new items
    (:func:`core.ranking_features.is_new` at the catalogue's clock ``now``) the ANN found:
    the newest of the ``pool`` best by ANN rank first (:func:`core.fusion.slot_order`)."""
    picked = {c.item_id for c in items}
    every = list(items) + [c for c in candidates if c.item_id not in picked]
    new, ages, content = [], [], []
    for c in every:
        created = float(c.row.get("created_at") or 0)
        new.append(is_new(float(c.row.get("popularity") or 0), created, now))
        ages.append(now - created if created > 0 else math.inf)
        content.append(-float(c.ranks["ann"]) if "ann" in c.ranks else -math.inf)
    found = fusion.slot_order(content, new, ages, pool)
    return [every[i] for i in fusion.explore(range(len(items)), found, new, k, share)]
