"""Stage ``retrieval`` for a "more like this" page: candidates anchored on the current item.

When the request names the item on screen (``RequestContext.current_item_id``), the
candidates are that item's nearest neighbours (the content ANN from its vector) and the
items that co-occur with it, fused as ordinary retrieval fuses them; the ranking stage then
orders them for the user as usual, so two users on the same page see the same neighbourhood
in their own order. The item itself, the user's history and the request's exclusions never
come back. Without Milvus the cached popularity answers, and the answer says so.
"""

from __future__ import annotations

from collections.abc import Sequence

from core.config import Settings
from services.recommend.context import Context, Filters, Stage
from services.recommend.retrieve import Retriever, ann_limit
from services.vectors.store import Row, StoreUnavailable, VectorStore


class UnknownItem(LookupError):
    """The current item is not in the catalogue (``NOT_FOUND``)."""


class Anchor(Stage):
    """Sets ``anchor`` (the current item's row) and ``candidates``."""

    name = "retrieval"

    def __init__(self, settings: Settings, store: VectorStore, retriever: Retriever) -> None:
        self.settings = settings
        self.store = store
        self.retriever = retriever

    def run(self, ctx: Context) -> None:
        n = self.settings.rank_candidates
        anchor_id = ctx.request.current_item_id
        filters = ctx.filters
        recent = set() if ctx.rules.repeats else set(ctx.history_ids)  # repeat policy
        seen = Filters(filters.categories, filters.exclude | recent | {anchor_id})
        seen_all = Filters(filters.categories, seen.exclude | ctx.seen_ids())
        lists: dict[str, Sequence[Row | tuple[Row, str]]] = {}
        try:
            found = self.store.get_items(
                [anchor_id], ctx.deadline.left(), with_vectors=True, with_neighbours=True
            )
            if anchor_id not in found:
                raise UnknownItem(f"context.current_item_id {anchor_id!r} is not in the catalogue")
            ctx.anchor = anchor = found[anchor_id]
            limit = ann_limit(n, seen, seen_all)
            lists["ann"] = seen_all.admitted(
                self.retriever.ann(anchor["vector"], limit, seen, ctx.deadline)
            )[:n]
            co_ids = [i for i in anchor.get("co_items") or [] if i not in seen_all.exclude]
            rows = self.retriever.rows(co_ids, ctx.deadline)
            co = seen_all.admitted(rows[i] for i in co_ids if i in rows)[:n]
            lists["co_occurrence"] = [(r, anchor["title"]) for r in co]
        except StoreUnavailable as exc:
            ctx.degraded.append(f"milvus unavailable: {exc}")
            lists["popular"] = self.retriever.global_popular(n, seen_all)
        weights = ctx.variant.retrieval_mix or self.settings.retrieval_weights
        ctx.candidates = Retriever.fuse(lists, weights, n)
