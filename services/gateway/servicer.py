"""The ``recsys.v1.RecommenderService`` implementation: validation, composition, errors.

Every RPC turns its deadline into a :class:`Deadline` that reaches Triton and Milvus, and maps
failures to gRPC codes in one place (:func:`rpc`): bad input is ``INVALID_ARGUMENT``, a missing
entity ``NOT_FOUND``, an unreachable dependency ``UNAVAILABLE`` (unless a degraded answer is
possible), a passed deadline ``DEADLINE_EXCEEDED``; nothing else escapes as a crash. Every
error carries a ``google.rpc.Status`` with an ``ErrorInfo`` reason code (and a ``BadRequest``
field violation for bad input): :mod:`services.reliability.error_details`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from core.config import Settings
from core.rows import item_row
from core.text import item_text
from services.api import pb, pb_grpc
from services.api import validation as v
from services.deadline import Deadline, DeadlineExceeded
from services.events.log import EventLogUnavailable
from services.experiments.assignment import Assignment
from services.gateway.metrics import record_recommendation
from services.gateway.sessions import Sessions
from services.gateway.state import GatewayState
from services.gateway.streams import StreamIdle, client_messages
from services.inference.triton_client import InferenceUnavailable
from services.recommend.anchor import UnknownItem
from services.recommend.context import Filters, Recommendation, RequestContext, Rules
from services.recommend.rules import merge
from services.reliability.concurrency import SlotUnavailable
from services.reliability.error_details import abort_with_details
from services.reliability.redaction import public_degraded, public_unavailable
from services.reliability.retry_info import jittered
from services.vectors.store import Row, StoreUnavailable

log = logging.getLogger(__name__)
EVENT_LOG_RETRY_S = 1.0  # back-off hinted when the event log did not acknowledge
Req = TypeVar("Req")
Resp = TypeVar("Resp")


# The ErrorInfo reason of each kind of failure (domain "recsys.v1").
UNAVAILABLE_REASONS = {
    EventLogUnavailable: "EVENT_LOG_UNAVAILABLE",
    StoreUnavailable: "VECTOR_STORE_UNAVAILABLE",
    InferenceUnavailable: "MODEL_SERVER_UNAVAILABLE",
}
# Degraded reasons (the pipeline's "<head>: <detail>") as the API's enum.
DEGRADED_CODES = {
    "milvus unavailable": pb.DEGRADED_REASON_VECTOR_STORE_UNAVAILABLE,
    "feature ranker unavailable": pb.DEGRADED_REASON_FEATURE_RANKER_UNAVAILABLE,
    "sequence model unavailable": pb.DEGRADED_REASON_SEQUENCE_MODEL_UNAVAILABLE,
    "cross-encoder unavailable": pb.DEGRADED_REASON_CROSS_ENCODER_UNAVAILABLE,
    "session store unavailable": pb.DEGRADED_REASON_SESSION_STORE_UNAVAILABLE,
}
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000
MAX_RANK_ITEMS = 500
PAGE_TOKEN_PREFIX = b"items-after:"


class NotFound(LookupError):
    """The named entity does not exist; ``reason`` is the ErrorInfo code."""

    def __init__(self, message: str, reason: str = "NOT_FOUND") -> None:
        super().__init__(message)
        self.reason = reason


class Failed(Exception):
    """A refusal with its own code and reason (a stream past its bounds)."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str, field: str = ""):
        super().__init__(message)
        self.code, self.reason, self.field = code, reason, field


def rpc(method: Callable[[Any, Req, grpc.ServicerContext], Resp]) -> Callable[..., Resp]:
    """Map the platform's exceptions to gRPC status codes with clear messages and details."""

    @functools.wraps(method)
    def wrapper(self: RecommenderServicer, request: Req, context: grpc.ServicerContext) -> Resp:
        name = method.__name__
        try:
            return method(self, request, context)
        except v.InvalidArgument as exc:
            violations = [(exc.field, str(exc))] if exc.field else []
            code = grpc.StatusCode.INVALID_ARGUMENT
            abort_with_details(context, code, str(exc), exc.reason, violations)
        except NotFound as exc:
            abort_with_details(context, grpc.StatusCode.NOT_FOUND, str(exc), exc.reason)
        except UnknownItem as exc:
            abort_with_details(context, grpc.StatusCode.NOT_FOUND, str(exc), "ITEM_NOT_FOUND")
        except Failed as exc:
            violations = [(exc.field, str(exc))] if exc.field else []
            abort_with_details(context, exc.code, str(exc), exc.reason, violations)
        except StreamIdle as exc:
            message = f"{name}: {exc}; the events sent before are stored"
            code = grpc.StatusCode.DEADLINE_EXCEEDED
            abort_with_details(context, code, message, "STREAM_IDLE")
        except SlotUnavailable as exc:
            code, delay = grpc.StatusCode.RESOURCE_EXHAUSTED, jittered(EVENT_LOG_RETRY_S)
            abort_with_details(context, code, str(exc), "OVERLOADED", retry_delay_s=delay)
        except DeadlineExceeded:
            log.warning("%s: the deadline passed in the gateway", name)
            code, message = grpc.StatusCode.DEADLINE_EXCEEDED, f"{name}: deadline passed"
            abort_with_details(context, code, message)
        except EventLogUnavailable as exc:  # nothing was acknowledged: retrying is safe
            log.warning("%s unavailable: %s", name, exc)
            code, message = grpc.StatusCode.UNAVAILABLE, public_unavailable(exc)
            reason = UNAVAILABLE_REASONS[EventLogUnavailable]
            delay = jittered(EVENT_LOG_RETRY_S)
            abort_with_details(context, code, message, reason, retry_delay_s=delay)
        except (StoreUnavailable, InferenceUnavailable) as exc:
            log.warning("%s unavailable: %s", name, exc)  # details stay in the log
            reason = next(r for k, r in UNAVAILABLE_REASONS.items() if isinstance(exc, k))
            code = grpc.StatusCode.UNAVAILABLE
            abort_with_details(context, code, public_unavailable(exc), reason)
        except Exception:
            log.exception("%s failed", name)
            code = grpc.StatusCode.INTERNAL
            abort_with_details(context, code, f"{name}: internal error", "INTERNAL_ERROR")

    return wrapper


def _request_rules(
    request: pb.RecommendRequest | pb.RankItemsRequest,
) -> tuple[frozenset[str], int, Rules]:
    """A request's ``(exclude_categories, min_created_at, rules)``: its item filter, repeat
    policy and business rules, validated (Recommend and RankItems take the same fields)."""
    exclude_categories, min_created_at = v.check_item_filter(request.item_filter)
    allow_seen, allow_seen_categories = v.check_repeat_policy(request.repeat_policy)
    boost, bury, pin = v.check_business_rules(request.business_rules)
    return (
        exclude_categories,
        min_created_at,
        Rules(allow_seen, allow_seen_categories, boost, bury, pin),
    )


def _event_time(event: pb.Event) -> tuple[int, int]:
    return (event.event_time.seconds, event.event_time.nanos)


def new_recommendation_id() -> str:
    """A unique, opaque attribution token (32 hex digits: a valid id on events)."""
    return uuid.uuid4().hex


def degraded_codes(reasons: list[str]) -> list[int]:
    """The degraded reasons as ``DegradedReason`` values, each once, in order."""
    heads = (reason.split(":", 1)[0].strip() for reason in reasons)
    codes = (DEGRADED_CODES.get(h, pb.DEGRADED_REASON_UNSPECIFIED) for h in heads)
    return list(dict.fromkeys(codes))


def page_token(last_item_id: str) -> str:
    """The opaque token of the page after ``last_item_id``."""
    return base64.urlsafe_b64encode(PAGE_TOKEN_PREFIX + last_item_id.encode()).decode()


def after_token(token: str) -> str:
    """The item id a ``page_token`` continues after ("" for the first page)."""
    if not token:
        return ""
    try:
        raw = base64.urlsafe_b64decode(token.encode("ascii"))
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raw = b""
    if not raw.startswith(PAGE_TOKEN_PREFIX):
        raise v.InvalidArgument(
            "page_token is not a token this API returned: pass next_page_token as it came",
            "page_token",
            "INVALID_PAGE_TOKEN",
        )
    return v.check_id(raw[len(PAGE_TOKEN_PREFIX) :].decode("ascii", "replace"), "page_token")


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
        self.sessions = Sessions(settings, state.events)

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
        surface, device, current_item_id, session_id = v.check_context(request.context)
        v.check_visitor(request.user_id, session_id, "user_id", "context.session_id")
        user_id = request.user_id  # empty for an anonymous session
        k = v.check_k(request.k, self.settings)
        exclude = {*v.check_excludes(request.exclude_item_ids), current_item_id} - {""}
        exclude_categories, min_created_at, rules = _request_rules(request)
        filters = Filters(
            tuple(v.check_categories(request.categories)),
            frozenset(exclude),
            exclude_categories,
            min_created_at,
        )
        # the surface's configured rules join the request's (which win a conflict)
        filters, rules = merge(self.state.rules.for_surface(surface), filters, rules)
        diversity = v.check_diversity(request)
        degraded: list[str] = []
        session_items: tuple[str, ...] = ()
        if session_id:
            try:
                budget = deadline.reserve(0.5).left()
                session_items = tuple(self.sessions.recent(session_id, budget))
            except EventLogUnavailable as exc:  # answer as a new session, and say so
                degraded.append(f"session store unavailable: {exc}")
        situation = RequestContext(surface, device, current_item_id, session_id, session_items)
        # anonymous sessions are in no experiment (nothing to keep the arm stable on)
        assignments, variant = self.state.experiments.for_user(user_id) if user_id else ([], None)
        result = self.state.pipeline.recommend(
            user_id, k, filters, deadline, diversity, variant, situation, rules
        )
        result.degraded[:0] = degraded
        record_recommendation(result.candidates, result.degraded)  # stages timed themselves
        recommendation_id, items = self._exposed(user_id, assignments, result, situation, deadline)
        return pb.RecommendResponse(
            items=items,
            degraded=bool(result.degraded),
            degraded_reason=public_degraded(result.degraded),
            cold_start=result.cold_start,
            model_version=result.release,
            experiment_arm=";".join(a.label() for a in assignments),
            recommendation_id=recommendation_id,
            degraded_reasons=degraded_codes(result.degraded),
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
            raise NotFound(f"item {item_id!r} is not in the catalogue", "ITEM_NOT_FOUND")
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
        row = self.state.profile(user_id, deadline, with_vector=False)
        if row is None:
            raise NotFound(f"user {user_id!r} has no profile", "USER_NOT_FOUND")
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
        """Bounded: at most ``max_events_per_stream`` events, each message awaited at most
        ``stream_idle_timeout_s`` without holding a concurrency slot (:mod:`.streams`)."""
        deadline = self._deadline(context)
        accepted = duplicates = 0
        last_seq: dict[str, int] = {}
        limit, idle = self.settings.max_events_per_stream, self.settings.stream_idle_timeout_s
        for message in client_messages(request_iterator, idle, deadline):
            if accepted + duplicates + len(message.events) > limit:
                raise Failed(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "STREAM_TOO_LONG",
                    f"a stream carries at most {limit} events: the {accepted + duplicates} "
                    "sent before this message are stored; send the rest in a new stream",
                    "events",
                )
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
        users = [e for e in events if e.user_id]
        sessions: dict[str, list[str]] = {}
        for event in sorted((e for e in events if not e.user_id), key=_event_time):
            sessions.setdefault(event.session_id, []).append(event.item_id)
        accepted = duplicates = 0
        last_seq: dict[str, int] = {}
        if users:
            result = self.state.events.call(
                lambda log: log.publish(users), deadline.reserve(0.1).left()
            )
            # a retried click is feedback once, like the event itself
            self._record_feedback([users[i] for i in result.stored])
            accepted, duplicates, last_seq = result.accepted, result.duplicates, result.last_seq
        for session_id, item_ids in sessions.items():  # kept with the TTL, never profiled
            self.sessions.add(session_id, item_ids, deadline.reserve(0.1).left())
            accepted += len(item_ids)
        return accepted, duplicates, last_seq

    def _wait_applied(self, last_seq: dict[str, int], deadline: Deadline) -> None:
        """Read-your-writes: wait, within the deadline, until the profile workers applied
        these events, so the caller's next Recommend sees them. Not an error when they have
        not yet (Triton or Milvus down, a backlog): the events are durable and will apply."""
        if not self.settings.ingest_wait_applied_s or not last_seq:
            return
        with contextlib.suppress(EventLogUnavailable, DeadlineExceeded):
            answer_by = deadline.reserve(0.1)  # a tenth of what is left stays for the reply
            budget = min(self.settings.ingest_wait_applied_s, answer_by.left())
            # the wait's own clock can overrun (a busy event loop): the reply's share cannot
            self.state.events.call(lambda log: log.wait_applied(last_seq, budget), answer_by.left())

    def _exposed(
        self,
        user_id: str,
        assignments: list[Assignment],
        result: Recommendation,
        situation: RequestContext,
        deadline: Deadline,
    ) -> tuple[str, list[pb.ScoredItem]]:
        """A new recommendation id, the answer's items recorded under it as the user's
        exposure with the surface and device (clicks carrying the id join it exactly), and
        the items as the API sends them. Past the deadline (even the popular answer the
        pipeline keeps time for came too late) the client has given up: ``DEADLINE_EXCEEDED``,
        and no exposure is recorded for items nobody received."""
        deadline.left()
        recommendation_id = new_recommendation_id()
        self.state.experiments.exposed(
            user_id,
            assignments,
            [c.item_id for c in result.items],
            request_id=recommendation_id,
            surface=situation.surface,
            device=situation.device,
        )
        items = [
            _scored(c.row, c.relevance, reason, c.best_source, c.ctr)
            for c, reason in zip(result.items, result.reasons, strict=True)
        ]
        return recommendation_id, items

    def _record_feedback(self, events: list[pb.Event]) -> None:
        """Clicks and purchases of users in experiments, logged with their arm."""
        for event in events:
            if event.event_type in (pb.EVENT_TYPE_CLICK, pb.EVENT_TYPE_PURCHASE):
                self.state.experiments.clicked(
                    event.user_id,
                    [event.item_id],
                    recommendation_id=event.recommendation_id or None,
                )

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
            raise v.InvalidArgument("items must not be empty", "items", "FIELD_REQUIRED")
        if len(items) > self.settings.max_items_per_call:
            raise v.InvalidArgument(
                f"items: at most {self.settings.max_items_per_call} per call, got {len(items)}",
                "items",
                "TOO_MANY_ENTRIES",
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

    @rpc
    def GetItem(self, request: pb.GetItemRequest, context: grpc.ServicerContext):
        deadline = self._deadline(context)
        item_id = v.check_id(request.item_id, "item_id")
        found = self.state.store.get_items([item_id], deadline.left())
        if item_id not in found:
            raise NotFound(f"item {item_id!r} is not in the catalogue", "ITEM_NOT_FOUND")
        return pb.GetItemResponse(item=_item(found[item_id]))

    @rpc
    def ListItems(self, request: pb.ListItemsRequest, context: grpc.ServicerContext):
        """Keyset pagination in item id order: a page token is the last id of the page
        before, so pages stay stable while items are added or deleted."""
        deadline = self._deadline(context)
        if request.page_size < 0:
            raise v.InvalidArgument(
                f"page_size must not be negative, got {request.page_size}",
                "page_size",
                "OUT_OF_RANGE",
            )
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = after_token(request.page_token)
        rows = self.state.store.list_items(after, size + 1, deadline.left())
        more = len(rows) > size
        rows = rows[:size]
        return pb.ListItemsResponse(
            items=[_item(r) for r in rows],
            next_page_token=page_token(rows[-1]["item_id"]) if more else "",
        )

    @rpc
    def DeleteItem(self, request: pb.DeleteItemRequest, context: grpc.ServicerContext):
        deadline = self._deadline(context)
        item_id = v.check_id(request.item_id, "item_id")
        existed = self.state.store.delete_item(item_id, deadline.left())
        self.state.popular.discard(item_id)  # the cache must not serve it until its refresh
        return pb.DeleteItemResponse(existed=existed)

    @rpc
    def RankItems(self, request: pb.RankItemsRequest, context: grpc.ServicerContext):
        deadline = self._deadline(context)
        user_id = v.check_id(request.user_id, "user_id")
        item_ids = v.check_ids(request.item_ids, "item_ids", MAX_RANK_ITEMS, required=True)
        surface, device, current_item_id, session_id = v.check_context(request.context)
        v.check_unused(
            (current_item_id, "context.current_item_id"),
            (session_id, "context.session_id"),
            method="RankItems",
        )
        exclude_categories, min_created_at, rules = _request_rules(request)
        filters = Filters((), frozenset(), exclude_categories, min_created_at)
        filters, rules = merge(self.state.rules.for_surface(surface), filters, rules)
        situation = RequestContext(surface, device)
        assignments, variant = self.state.experiments.for_user(user_id)
        result, unknown = self.state.pipeline.rank_items(
            user_id, list(dict.fromkeys(item_ids)), deadline, variant, filters, rules, situation
        )
        recommendation_id, items = self._exposed(user_id, assignments, result, situation, deadline)
        return pb.RankItemsResponse(
            items=items,
            unknown_item_ids=unknown,
            recommendation_id=recommendation_id,
            degraded=bool(result.degraded),
            degraded_reasons=degraded_codes(result.degraded),
            model_version=result.release,
            filtered_item_ids=result.left_out,
        )
