"""Stage ``profile``: the user's Milvus row and the rows of their recent history.

It is the first Milvus read of a request; when it fails the pipeline answers from the cached
popularity instead (:class:`~services.recommend.retrieve.PopularOnly`).
"""

from __future__ import annotations

from core.config import Settings
from services.recommend.context import Context, Stage
from services.vectors.store import VectorStore


class LoadProfile(Stage):
    """Sets ``profile``, ``history_ids``, ``history`` (the window's rows with vectors and
    neighbours) and ``cold``; raises :class:`~services.vectors.store.StoreUnavailable`."""

    name = "profile"

    def __init__(self, settings: Settings, store: VectorStore) -> None:
        self.settings = settings
        self.store = store

    def run(self, ctx: Context) -> None:
        profile = self.store.get_user(ctx.user_id, ctx.deadline.left())
        history_ids = list(profile["recent_items"]) if profile else []
        window = history_ids[: self.settings.history_window]
        found = self.store.get_items(
            window, ctx.deadline.left(), with_vectors=True, with_neighbours=True
        )
        # set only once both reads succeeded: a failed read leaves a context with no profile
        ctx.profile = profile
        ctx.history_ids = history_ids
        ctx.history = [found[i] for i in window if i in found]
        ctx.cold = len(history_ids) <= self.settings.cold_start_events
