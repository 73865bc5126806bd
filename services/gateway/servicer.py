"""The ``recsys.v1.RecommenderService`` implementation: validation, composition, errors.

Every RPC turns its deadline into a :class:`Deadline` that reaches Triton and Milvus, and maps
failures to gRPC codes in one place (:func:`rpc`): bad input is ``INVALID_ARGUMENT``, a missing
entity ``NOT_FOUND``, an unreachable dependency ``UNAVAILABLE`` (unless a degraded answer is
possible), a passed deadline ``DEADLINE_EXCEEDED``; nothing else escapes as a crash.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from services.api import pb, pb_grpc
from services.config import Settings
from services.deadline import Deadline, DeadlineExceeded
from services.gateway import validation as v
from services.gateway.state import GatewayState
from services.inference.triton_client import InferenceUnavailable
from services.vectors.store import Row, StoreUnavailable
from training.features.text import item_text

log = logging.getLogger(__name__)
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
        except (StoreUnavailable, InferenceUnavailable) as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
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


def _scored(row: Row, score: float, reason: str, source: str) -> pb.ScoredItem:
    return pb.ScoredItem(item=_item(row), score=score, reason=reason, source=source)


class RecommenderServicer(pb_grpc.RecommenderServiceServicer):
    """Composes profiles (Milvus user rows), retrieval (Milvus ANN, popularity) and Triton."""

    def __init__(self, settings: Settings, state: GatewayState) -> None:
        self.settings = settings
        self.state = state

    def _deadline(self, context: grpc.ServicerContext) -> Deadline:
        return Deadline.from_remaining(context.time_remaining(), self.settings.default_deadline_s)

    # --- Recommend ---------------------------------------------------------------------
    @rpc
    def Recommend(self, request: pb.RecommendRequest, context: grpc.ServicerContext):
        deadline = self._deadline(context)
        user_id = v.check_id(request.user_id, "user_id")
        k = v.check_k(request.k, self.settings)
        categories = v.check_categories(request.categories)
        exclude = set(v.check_excludes(request.exclude_item_ids))
        v.check_diversity(request)
        response = pb.RecommendResponse(model_version=self.state.model_version)
        store = self.state.store
        try:
            profile = self.state.profiles.get(user_id, deadline.left())
        except StoreUnavailable as exc:
            return self._popular_answer(response, k, categories, exclude, f"milvus: {exc}")
        if profile is None or not profile["recent_items"]:
            response.cold_start = True
            return self._popular_answer(response, k, categories, exclude, "")
        seen = exclude | set(profile["recent_items"])
        try:
            hits = store.search_items(
                profile["vector"], k, deadline.left(), categories, sorted(seen), with_vectors=True
            )
            reasons = self._similar_reasons(profile, hits, deadline)
        except StoreUnavailable as exc:
            return self._popular_answer(response, k, categories, seen, f"milvus: {exc}")
        for hit, reason in zip(hits, reasons, strict=True):
            response.items.append(_scored(hit, hit["score"], reason, "ann"))
        if len(hits) < k:  # filters left too few neighbours: top up with popular items
            taken = seen | {h["item_id"] for h in hits}
            for row in self.state.popular.top(k - len(hits), categories, taken):
                response.items.append(_scored(row, 0.0, "popular overall", "popular"))
        return response

    def _popular_answer(
        self,
        response: pb.RecommendResponse,
        k: int,
        categories: list[str],
        exclude: set[str],
        degraded: str,
    ) -> pb.RecommendResponse:
        rows = self.state.popular.top(k, categories, exclude)
        top = max((float(r["popularity"]) for r in rows), default=1.0) or 1.0
        for row in rows:
            response.items.append(
                _scored(row, float(row["popularity"]) / top, "popular overall", "popular")
            )
        if degraded:
            response.degraded = True
            response.degraded_reason = degraded
        return response

    def _similar_reasons(self, profile: Row, hits: list[Row], deadline: Deadline) -> list[str]:
        """'similar to <title> you liked', naming the history item closest to each hit."""
        recent = profile["recent_items"][: self.settings.history_window]
        history = self.state.store.get_items(recent, deadline.left(), with_vectors=True)
        if not history or not hits:
            return ["matches your recent history"] * len(hits)
        titles = [row["title"] for row in history.values()]
        matrix = np.stack([row["vector"] for row in history.values()])
        sims = np.stack([h["vector"] for h in hits]) @ matrix.T
        return [f"similar to {titles[int(i)]} you liked" for i in sims.argmax(axis=1)]

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
        accepted, duplicates = self._ingest(list(request.events), self._deadline(context))
        return pb.IngestEventsResponse(accepted_count=accepted, duplicate_count=duplicates)

    @rpc
    def StreamIngestEvents(
        self,
        request_iterator: Iterator[pb.StreamIngestEventsRequest],
        context: grpc.ServicerContext,
    ):
        deadline = self._deadline(context)
        accepted = duplicates = 0
        for message in request_iterator:
            a, d = self._ingest(list(message.events), deadline)
            accepted, duplicates = accepted + a, duplicates + d
        return pb.StreamIngestEventsResponse(accepted_count=accepted, duplicate_count=duplicates)

    def _ingest(self, events: list[pb.Event], deadline: Deadline) -> tuple[int, int]:
        v.check_events(events, self.settings.max_events_per_call)
        self.state.profiles.apply(events, deadline)
        return len(events), 0

    @rpc
    def DeleteUser(self, request: pb.DeleteUserRequest, context: grpc.ServicerContext):
        deadline = self._deadline(context)
        user_id = v.check_id(request.user_id, "user_id")
        existed = self.state.store.delete_user(user_id, deadline.left())
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
        existing = self.state.store.get_items([i.item_id for i in items], deadline.left())
        texts = [item_text(i.title, list(i.categories), i.description) for i in items]
        vectors = self.state.triton.embed_items(texts, deadline.left())
        now = int(time.time())
        rows = [
            {
                "item_id": item.item_id,
                "title": item.title.strip(),
                "categories": list(item.categories),
                "popularity": float(existing.get(item.item_id, {}).get("popularity", 0.0)),
                "created_at": item.create_time.seconds if item.HasField("create_time") else now,
                "vector": vec.tolist(),
            }
            for item, vec in zip(items, vectors, strict=True)
        ]
        count = self.state.store.upsert_items(rows, deadline.left())
        return pb.UpsertItemsResponse(upserted_count=count)
