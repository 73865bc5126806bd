"""Stage ``profile``: the user's Milvus row and the rows of their recent history.

It is the first Milvus read of a request; when it fails the pipeline answers from the cached
popularity instead (:class:`~services.recommend.retrieve.PopularOnly`).
"""

from __future__ import annotations

from collections.abc import Callable

from core.config import Settings
from services.recommend.context import Context, Stage
from services.vectors.store import VectorStore


class LoadProfile(Stage):
    """Sets ``profile``, ``history_ids``, ``history`` (the window's rows with vectors and
    neighbours) and ``cold``; raises :class:`~services.vectors.store.StoreUnavailable`."""

    name = "profile"

    def __init__(
        self,
        settings: Settings,
        store: VectorStore,
        applied_version: Callable[[str, float], int | None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        # The row version the profile workers have applied (the shared event log): what makes
        # a Recommend after IngestEvents see those events, through any replica.
        self.applied_version = applied_version

    def run(self, ctx: Context) -> None:
        # the user-tower vector only when the ANN asks with it (1.5 KB less per read otherwise)
        with_vector = self.settings.ann_query == "user_tower"
        if ctx.request.anonymous:  # a session: its own items, never a user row
            profile, history_ids = None, list(ctx.request.session_items)
        else:
            # asked of the event log only where a read can miss a worker's write
            version: int | None = None
            if self.applied_version and self.store.user_reads_may_lag(ctx.deadline.left()):
                version = self.applied_version(ctx.user_id, ctx.deadline.left())
            profile = self.store.get_user(
                ctx.user_id, ctx.deadline.left(), with_vector, min_version=version
            )
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
