"""Stage ``diversify``: the final ``k`` by maximal marginal relevance over item vectors.

λ comes from the request, else the experiment variant, else the settings; without a vector
for every candidate it falls back to plain relevance order (λ = 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from core import fusion
from core.config import Settings
from services.recommend.context import Candidate, Context, Stage


def mmr(candidates: Sequence[Candidate], k: int, diversity: float) -> list[Candidate]:
    """The final ``k`` by maximal marginal relevance (:func:`core.fusion.mmr`) over the item
    vectors; with λ = 0 this is plain relevance order."""
    if not candidates:
        return []
    pool = list(candidates)
    relevance = np.array([c.relevance for c in pool], dtype=np.float64)
    vectors = (
        np.stack([np.asarray(c.row["vector"], dtype=np.float32) for c in pool])
        if diversity > 0
        else None
    )
    return [pool[i] for i in fusion.mmr(relevance, vectors, k, diversity)]


class Diversify(Stage):
    """Sets ``items``: the ``k`` candidates MMR picks, in pick order."""

    name = "diversify"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def run(self, ctx: Context) -> None:
        lam = ctx.diversity if ctx.diversity is not None else ctx.variant.mmr_lambda
        lam = self.settings.mmr_lambda if lam is None else lam
        with_vectors = all("vector" in c.row for c in ctx.candidates)
        ctx.items = mmr(ctx.candidates, ctx.k, lam if with_vectors else 0.0)
