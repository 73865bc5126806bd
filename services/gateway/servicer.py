"""The ``recsys.v1.RecommenderService`` implementation: validation, composition, errors.

Every RPC turns its deadline into a :class:`Deadline` that reaches Triton and Milvus, and maps
failures to gRPC codes in one place (:func:`rpc`): bad input is ``INVALID_ARGUMENT``, a missing
entity ``NOT_FOUND``, an unreachable dependency ``UNAVAILABLE`` (unless a degraded answer is
possible), a passed deadline ``DEADLINE_EXCEEDED``; nothing else escapes as a crash.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from core.config import Settings
from core.rows import item_row
from core.text import item_text
from services.api import pb, pb_grpc
from services.deadline import Deadline, DeadlineExceeded
from services.events.log import EventLogUnavailable
from services.gateway import validation as v
from services.gateway.metrics import record_recommendation
from services.gateway.state import GatewayState
from services.inference.triton_client import InferenceUnavailable
from services.recommend.context import Filters
from services.reliability.redaction import public_degraded, public_unavailable
from services.reliability.retry_info import jittered, retry_trailers
from services.vectors.store import Row, StoreUnavailable

log = logging.getLogger(__name__)
EVENT_LOG_RETRY_S = 1.0  # back-off hinted when the event log did not acknowledge
Req = TypeVar("Req")
Resp = TypeVar("Resp")


class NotFound(LookupError):
    """The named entity does not exist."""


def rpc(method: Callable[[Any, Req, grpc.ServicerContext], Resp]) -> Callable[..., Resp]:
    """Map the platform's exceptions to gRPC status codes with clear messages."""

    @functools.wraps(method)
    def wrapper(self: RecommenderServicer, request: Req, context: grpc.ServicerContext) -> Resp:
        try:
            return method(self, request, context)
        except v.InvalidArgument as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except NotFound as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except DeadlineExceeded:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"{method.__name__}: deadline passed")
        except EventLogUnavailable as exc:  # nothing was acknowledged: retrying is safe
            log.warning("%s unavailable: %s", method.__name__, exc)
            code, message = grpc.StatusCode.UNAVAILABLE, public_unavailable(exc)
            context.set_trailing_metadata(
                retry_trailers(code.value[0], message, jittered(EVENT_LOG_RETRY_S))
            )
            context.abort(code, message)
        except (StoreUnavailable, InferenceUnavailable) as exc:
            log.warning("%s unavailable: %s", method.__name__, exc)  # details stay in the log
            context.abort(grpc.StatusCode.UNAVAILABLE, public_unavailable(exc))
        except Exception:
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__}: internal error")
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


def _item(row: Row) -> pb.Item:
    item = pb.Item(item_id=row["item_id"], title=row["title"], categories=row["categories"])
    if row.get("created_at"):
        item.create_time.FromSeconds(int(row["created_at"]))
    return item


def _scored(
    row: Row, score: float, reason: str, source: str, click_probability: float | None = None
) -> pb.ScoredItem:
    return pb.ScoredItem(
        item=_item(row),
        score=score,
        reason=reason,
        source=source,
        click_probability=click_probability or 0.0,
    )


class RecommenderServicer(pb_grpc.RecommenderServiceServicer):
    """Composes profiles (Milvus user rows), retrieval (Milvus ANN, popularity) and Triton."""

    def __init__(self, settings: Settings, state: GatewayState) -> None:
        self.settings = settings
        self.state = state

    def _deadline(self, context: grpc.ServicerContext) -> Deadline:
        """The client's deadline, or the default when it set none, never beyond the maximum."""
        return Deadline.from_remaining(
            context.time_remaining(),
            self.settings.default_deadline_s,
            self.settings.max_deadline_s,
        )

    # --- Recommend ---------------------------------------------------------------------
    @rpc
    def Recommend(self, request: pb.RecommendRequest, context: grpc.ServicerContext):
        deadline = self._deadline(context)
        user_id = v.check_id(request.user_id, "user_id")
        k = v.check_k(request.k, self.settings)
        filters = Filters(
            tuple(v.check_categories(request.categories)),
            frozenset(v.check_excludes(request.exclude_item_ids)),
        )
        diversity = v.check_diversity(request)
        assignments, variant = self.state.experiments.for_user(user_id)
        result = self.state.pipeline.recommend(user_id, k, filters, deadline, diversity, variant)
        record_recommendation(result.candidates, result.degraded)  # stages timed themselves
        self.state.experiments.exposed(user_id, assignments, [c.item_id for c in result.items])
        return pb.RecommendResponse(
            items=[
                _scored(c.row, c.relevance, reason, c.best_source, c.ctr)
                for c, reason in zip(result.items, result.reasons, strict=True)
            ],
            degraded=bool(result.degraded),
            degraded_reason=public_degraded(result.degraded),
            cold_start=result.cold_start,
            model_version=variant.model_version or self.state.model_version,
            experiment_arm=";".join(a.label() for a in assignments),
        )

    # --- SimilarItems --------------------------------------------------------------------
    @rpc
    def SimilarItems(self, request: pb.SimilarItemsRequest, context: grpc.ServicerContext):
        deadline = self._deadline(context)
        item_id = v.check_id(request.item_id, "item_id")
        k = v.check_k(request.k, self.settings)
        categories = v.check_categories(request.categories)
        exclude = {item_id, *v.check_excludes(request.exclude_item_ids)}
        anchor = self.state.store.get_items([item_id], deadline.left(), with_vectors=True)
        if item_id not in anchor:
            raise NotFound(f"item {item_id!r} is not in the catalogue")
        hits = self.state.store.search_items(
            anchor[item_id]["vector"], k, deadline.left(), categories, sorted(exclude)
        )
        title = anchor[item_id]["title"]
        return pb.SimilarItemsResponse(
            items=[_scored(h, h["score"], f"similar to {title}", "ann") for h in hits]
        )

    # --- profiles ------------------------------------------------------------------------
    @rpc
    def GetUserProfile(self, request: pb.GetUserProfileRequest, context: grpc.ServicerContext):
        deadline = self._deadline(context)
        user_id = v.check_id(request.user_id, "user_id")
        row = self.state.profiles.get(user_id, deadline.left(), with_vector=False)
        if row is None:
            raise NotFound(f"user {user_id!r} has no profile")
        interests = sorted(row["interests"].items(), key=lambda kv: -kv[1])
        updated = Timestamp()
        updated.FromMilliseconds(int(row["updated_at"]))
        return pb.GetUserProfileResponse(
            user_id=user_id,
            history_size=int(row["history_size"]),
            top_interests=[pb.Interest(category=c, weight=w) for c, w in interests],
            segment=row["segment"],
            update_time=updated,
            recent_item_ids=row["recent_items"][:20],
            cold_start=not row["recent_items"],
        )

    @rpc
    def IngestEvents(self, request: pb.IngestEventsRequest, context: grpc.ServicerContext):
        deadline = self._deadline(context)
        accepted, duplicates, last_seq = self._ingest(list(request.events), deadline)
        self._wait_applied(last_seq, deadline)
        return pb.IngestEventsResponse(accepted_count=accepted, duplicate_count=duplicates)

    @rpc
    def StreamIngestEvents(
        self,
        request_iterator: Iterator[pb.StreamIngestEventsRequest],
        context: grpc.ServicerContext,
    ):
        deadline = self._deadline(context)
        accepted = duplicates = 0
        last_seq: dict[str, int] = {}
        for message in request_iterator:
            a, d, seqs = self._ingest(list(message.events), deadline)
            accepted, duplicates = accepted + a, duplicates + d
            last_seq.update(seqs)  # sequences grow: the later message's are the newer
        self._wait_applied(last_seq, deadline)
        return pb.StreamIngestEventsResponse(accepted_count=accepted, duplicate_count=duplicates)

    def _ingest(
        self, events: list[pb.Event], deadline: Deadline
    ) -> tuple[int, int, dict[str, int]]:
        """OK means durable: JetStream acknowledged every event (stored on its replicas)
        before the reply. A client's idempotency_key is the message id, so a retry through
        any gateway replica within the duplicate window is counted as a duplicate, once."""
        v.check_events(events, self.settings.max_events_per_call)
        result = self.state.events.call(
            lambda log: log.publish(events), deadline.reserve(0.1).left()
        )
        # a retried click is feedback once, like the event itself
        self._record_feedback([events[i] for i in result.stored])
        return result.accepted, result.duplicates, result.last_seq

    def _wait_applied(self, last_seq: dict[str, int], deadline: Deadline) -> None:
        """Read-your-writes: wait, within the deadline, until the profile workers applied
        these events, so the caller's next Recommend sees them. Not an error when they have
        not yet (Triton or Milvus down, a backlog): the events are durable and will apply."""
        if not self.settings.ingest_wait_applied_s or not last_seq:
            return
        with contextlib.suppress(EventLogUnavailable, DeadlineExceeded):
            budget = min(self.settings.ingest_wait_applied_s, deadline.reserve(0.1).left())
            self.state.events.call(lambda log: log.wait_applied(last_seq, budget), budget + 0.5)

    def _record_feedback(self, events: list[pb.Event]) -> None:
        """Clicks and purchases of users in experiments, logged with their arm."""
        for event in events:
            if event.event_type in (pb.EVENT_TYPE_CLICK, pb.EVENT_TYPE_PURCHASE):
                self.state.experiments.clicked(event.user_id, [event.item_id])

    @rpc
    def DeleteUser(self, request: pb.DeleteUserRequest, context: grpc.ServicerContext):
        deadline = self._deadline(context)
        user_id = v.check_id(request.user_id, "user_id")
        # Under the user's lease (no worker applies them meanwhile): purge their events from
        # the log and the dead letters, tombstone them (older events are never applied,
        # wherever they are), then delete the row.
        budget = deadline.reserve(0.2).left()
        row: list[bool] = []

        def delete_row() -> None:
            row.append(self.state.store.delete_user(user_id, deadline.left()))

        removed = self.state.events.call(
            lambda log: log.forget_user(user_id, budget * 0.5, delete_row), budget
        )
        removed += self.state.experiments.delete_user(user_id)
        existed = bool(row and row[0]) or removed > 0
        return pb.DeleteUserResponse(existed=existed)

    # --- catalogue -----------------------------------------------------------------------
    @rpc
    def UpsertItems(self, request: pb.UpsertItemsRequest, context: grpc.ServicerContext):
        deadline = self._deadline(context)
        items = list(request.items)
        if not items:
            raise v.InvalidArgument("items must not be empty")
        if len(items) > self.settings.max_items_per_call:
            raise v.InvalidArgument(
                f"items: at most {self.settings.max_items_per_call} per call, got {len(items)}"
            )
        for i, item in enumerate(items):
            v.check_item(item, i)
        existing = self.state.store.get_items(  # Strong: the signals kept must be the latest
            [i.item_id for i in items], deadline.left(), with_neighbours=True, consistency="Strong"
        )
        texts = [item_text(i.title, list(i.categories), i.description) for i in items]
        vectors = self.state.triton.embed_items(texts, deadline.left())
        now = int(time.time())
        rows = [
            item_row(
                item.item_id,
                item.title.strip(),
                list(item.categories),
                item.description,  # cut to the schema; the full text was embedded
                # behaviour signals belong to the item id, not its text: keep them
                popularity=float(existing.get(item.item_id, {}).get("popularity", 0.0)),
                co_items=list(existing.get(item.item_id, {}).get("co_items", [])),
                created_at=item.create_time.seconds if item.HasField("create_time") else now,
                vector=vec,
            )
            for item, vec in zip(items, vectors, strict=True)
        ]
        count = self.state.store.upsert_items(rows, deadline.left())
        return pb.UpsertItemsResponse(upserted_count=count)
