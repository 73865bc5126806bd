"""Stage ``explain``: one reason per recommended item, from the source that ranked it best,
except that "popular overall" gives way to the user's own history when a personal source
(co-occurrence, the ANN, the sequence model) found the item too (the ranker orders by all
the evidence at once, so a popular item that co-occurs with something the user liked is
explained by that).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from services.recommend.context import Candidate, Context, Stage
from services.vectors.store import Row

NEW_ITEM_AGE_S = 90 * 24 * 3600


def reason(cand: Candidate, history: Sequence[Row], anchor: Row | None = None) -> str:
    """New items first (no popularity yet), then the best source's own wording, a personal
    source's before global popularity's; on a "more like this" page the ANN's items are
    explained by the item on screen (``anchor``)."""
    row = cand.row
    created = int(row.get("created_at") or 0)
    if not row.get("popularity") and created and time.time() - created < NEW_ITEM_AGE_S:
        category = row["categories"][0] if row["categories"] else "the catalogue"
        return f"new in {category}"
    source = cand.best_source
    if source == "pinned":
        return "featured"
    if source == "popular":
        personal = [s for s in ("co_occurrence", "ann", "sequence") if s in cand.ranks]
        source = min(personal, key=lambda s: cand.ranks[s]) if personal else source
    if source == "ann" and anchor is not None:
        return f"similar to {anchor['title']}"
    if source in ("ann", "sequence") and history and "vector" in row:
        # the sequence model names no item: the nearest one of the recent history speaks
        sims = np.stack([h["vector"] for h in history]) @ np.asarray(row["vector"])
        title = history[int(np.argmax(sims))]["title"]
        if source == "sequence":
            return f"for your recent interest in {title}"
        return f"similar to {title} you liked"
    if source == "co_occurrence" and cand.because_of.get(source):
        return f"people who liked {cand.because_of[source]} also liked this"
    if source == "segment":
        return "popular in your segment"
    return "popular overall"


class Explain(Stage):
    """Sets ``reasons``, aligned with ``items``."""

    name = "explain"

    def run(self, ctx: Context) -> None:
        ctx.reasons = [reason(c, ctx.history, ctx.anchor) for c in ctx.items]
