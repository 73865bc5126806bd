"""Stage ``profile``: the user's Milvus row and the rows of their recent history.

It is the first Milvus read of a request; when it fails the pipeline answers from the cached
popularity instead (:class:`~services.recommend.retrieve.PopularOnly`).
"""

from __future__ import annotations

from collections.abc import Callable

from core.config import Settings
from services.deadline import Deadline
from services.recommend.context import Context, Stage
from services.vectors.store import Row, VectorStore

#: (user id, deadline, with the vector) -> the user's profile as of every acknowledged event
#: (the gateway's :meth:`~services.gateway.state.GatewayState.profile`).
ProfileRead = Callable[[str, Deadline, bool], Row | None]


class LoadProfile(Stage):
    """Sets ``profile``, ``history_ids``, ``history`` (the window's rows with vectors and
    neighbours) and ``cold``; raises :class:`~services.vectors.store.StoreUnavailable`."""

    name = "profile"

    def __init__(
        self,
        settings: Settings,
        store: VectorStore,
        read_profile: ProfileRead | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        # The Milvus row with the shared event log's unapplied events folded in: what makes
        # a Recommend after IngestEvents see those events, through any replica (without a
        # log: the row alone).
        self.read_profile = read_profile

    def run(self, ctx: Context) -> None:
        # the user-tower vector only when the ANN asks with it (1.5 KB less per read otherwise)
        with_vector = self.settings.ann_query == "user_tower"
        if ctx.request.anonymous:  # a session: its own items, never a user row
            profile, history_ids = None, list(ctx.request.session_items)
        else:
            if self.read_profile is not None:
                profile = self.read_profile(ctx.user_id, ctx.deadline, with_vector)
            else:
                profile = self.store.get_user(ctx.user_id, ctx.deadline.left(), with_vector)
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
