"""Stage ``rules``: the request's filters, repeat policy and business rules, around ranking.

Retrieval filters by the request's categories and exclusions as it searches; what it cannot
express there is applied here, on the candidates, before the ranker spends time on them
(:meth:`Rules.admit`): the attribute conditions (categories to leave out, a minimum creation
time) and the repeat policy per item (an item seen before comes back only when the policy
allows its categories). After ranking, boosted candidates are lifted above all others and
buried ones put below all others, each group keeping the ranker's order
(:meth:`Rules.adjust`); after the final pick, pinned items take the first slots
(:meth:`Rules.pin`), read from the catalogue whether or not retrieval found them, but
never an item the filters or the repeat policy keep out.
"""

from __future__ import annotations

from services.recommend.context import Candidate, Context
from services.vectors.store import Row, StoreUnavailable, VectorStore

PINNED = "pinned"  # the source of a pinned item


def allowed(ctx: Context, row: Row, seen: set[str]) -> bool:
    """The request's filters admit ``row`` and, if the user saw it, the repeat policy too."""
    if not ctx.filters.admits(row):
        return False
    return row["item_id"] not in seen or ctx.rules.may_repeat(row)


class ApplyRules:
    """Three steps of one stage: :meth:`admit` after retrieval, :meth:`adjust` after
    ranking, :meth:`pin` after diversification; the last two, when the request has rules,
    are timed under ``rules``."""

    name = "rules"

    def __init__(self, store: VectorStore) -> None:
        self.store = store

    @staticmethod
    def _seen(ctx: Context) -> set[str]:
        seen = ctx.profile["seen_items"] if ctx.profile else ()
        return {*ctx.history_ids, *seen}

    def admit(self, ctx: Context) -> None:
        """Drop the candidates the filters or the repeat policy keep out (in memory: not
        timed apart, its time counts toward ranking's)."""
        seen = self._seen(ctx)
        ctx.candidates = [c for c in ctx.candidates if allowed(ctx, c.row, seen)]

    def adjust(self, ctx: Context) -> None:
        """Boosted candidates above every other one, buried ones below (order kept within)."""
        rules = ctx.rules
        if not (rules.boost or rules.bury) or not ctx.candidates:
            return
        with ctx.timed(self.name):
            scores = [c.relevance for c in ctx.candidates]
            span = max(scores) - min(scores) + 1.0
            for cand in ctx.candidates:
                if cand.item_id in rules.boost:
                    cand.relevance += span
                elif cand.item_id in rules.bury:
                    cand.relevance -= span

    def pin(self, ctx: Context) -> None:
        """The pinned items first, in the request's order, then the picked items."""
        if not ctx.rules.pin:
            return
        with ctx.timed(self.name):
            try:
                rows = self.store.get_items(ctx.rules.pin, ctx.deadline.left(), with_vectors=True)
            except StoreUnavailable as exc:
                ctx.degraded.append(f"milvus unavailable: {exc}")
                return
            seen = self._seen(ctx)
            pins = [rows[i] for i in ctx.rules.pin if i in rows and allowed(ctx, rows[i], seen)]
            pins = pins[: ctx.k]
            top = max((c.relevance for c in ctx.items), default=0.0)
            pinned = [
                Candidate(r["item_id"], r, {PINNED: n}, relevance=top + len(pins) - n)
                for n, r in enumerate(pins)
            ]
            ids = {c.item_id for c in pinned}
            rest = [c for c in ctx.items if c.item_id not in ids]
            ctx.items = pinned + rest[: ctx.k - len(pinned)]
