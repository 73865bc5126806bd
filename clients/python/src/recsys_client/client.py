"""The typed client: one method per RPC, TLS / mutual TLS, API keys, deadlines and retries.

Retries are gRPC's own (the channel's service config), not a loop here: ``UNAVAILABLE`` and
``RESOURCE_EXHAUSTED`` are retried with exponential backoff on the idempotent calls only -
the reads, ``UpsertItems`` (a replace by id) and ``IngestEvents``, which is idempotent
because every event carries an idempotency key (filled here when the caller left it empty,
so a retry resends the same keys and the gateway counts each event once). ``DeleteUser``,
``DeleteItem`` and the client stream are never retried automatically. When the gateway
rejects a call with a retry hint (``google.rpc.RetryInfo``, mirrored in the
``grpc-retry-pushback-ms`` trailer that gRPC's retry logic reads), the next attempt waits
exactly that long. Every call has a deadline (``timeout``, 10 s by default) that bounds
all its attempts together.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from recsys_client._pb import pb, pb_grpc
from recsys_client.errors import from_rpc_error

DEFAULT_TIMEOUT_S = 10.0
SERVICE = "recsys.v1.RecommenderService"
# Safe to repeat: reads, replace-by-id upserts, and ingestion with idempotency keys.
RETRIED_METHODS = (
    "Recommend",
    "SimilarItems",
    "GetUserProfile",
    "GetItem",
    "ListItems",
    "RankItems",
    "IngestEvents",
    "UpsertItems",
)
RETRYABLE_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
STREAM_BATCH = 100
_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_SERVING = b"\x08\x01"  # grpc.health.v1.HealthCheckResponse{status: SERVING}

Reply = TypeVar("Reply")


def service_config(
    max_attempts: int = 4, initial_backoff_s: float = 0.2, max_backoff_s: float = 5.0
) -> str:
    """The channel's service config: the retry policy of :data:`RETRIED_METHODS`."""
    if max_attempts < 2:
        return json.dumps({"methodConfig": []})
    policy = {
        "maxAttempts": min(max_attempts, 5),  # gRPC caps attempts at 5
        "initialBackoff": f"{initial_backoff_s:g}s",
        "maxBackoff": f"{max_backoff_s:g}s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": list(RETRYABLE_CODES),
    }
    names = [{"service": SERVICE, "method": m} for m in RETRIED_METHODS]
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})


@dataclass(frozen=True)
class Tls:
    """TLS towards the gateway: ``ca_file`` None trusts the system roots; a certificate and
    key present a client identity (mutual TLS); ``server_name`` overrides the name checked
    in the server's certificate (when dialling an address the certificate does not name)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("mutual TLS needs both a client certificate and its key")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "CA") if self.ca_file else None,
            private_key=_read(self.key_file, "client key") if self.key_file else None,
            certificate_chain=_read(self.cert_file, "client certificate")
            if self.cert_file
            else None,
        )


def _read(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what} {path}: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"{what} {path}: not a PEM file")
    return data


def new_idempotency_key() -> str:
    """A fresh event key: 32 hex digits (valid in the gateway's id alphabet)."""
    return uuid.uuid4().hex


def fill_idempotency_keys(events: Iterable[pb.Event]) -> None:
    """Give every event without an idempotency key a fresh one, in place, so resending the
    same ``Event`` objects (by gRPC's retry or by the caller) never counts one twice."""
    for event in events:
        if not event.idempotency_key:
            event.idempotency_key = new_idempotency_key()


class RecommenderClient:
    """Channels to the gateway with typed calls; use as a context manager or :meth:`close`.

    ``api_key`` is sent as ``authorization: Bearer <key>``. ``tls`` (or ``True`` for the
    system roots) turns TLS on; without it the channel is plaintext (loopback only).

    ``connections``: calls take turns over this many TCP connections to ``target``. Load
    is spread per connection, not per call, by the gateway's processes on one port
    (``RECSYS_GATEWAY_PROCESSES``) and by a Kubernetes ClusterIP Service, so one connection
    keeps a client on one process of one pod; give a busy client at least as many
    connections as the processes it should reach. (gRPC shares one connection among a
    process's channels to the same target, so several clients alone do not do it: each
    channel here has a connection pool of its own when there are several.)
    """

    def __init__(
        self,
        target: str,
        timeout: float = DEFAULT_TIMEOUT_S,
        *,
        api_key: str | None = None,
        tls: Tls | bool | None = None,
        max_attempts: int = 4,
        options: Sequence[tuple[str, Any]] = (),
        connections: int = 1,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive: every call needs a deadline")
        if connections < 1:
            raise ValueError("connections must be at least 1")
        self.target = target
        self.timeout = timeout
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {api_key}"),) if api_key else ()
        )
        channel_options: list[tuple[str, Any]] = [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", service_config(max_attempts)),
            *options,
        ]
        if connections > 1:
            channel_options.append(("grpc.use_local_subchannel_pool", 1))
        credentials = None
        if tls:
            settings = tls if isinstance(tls, Tls) else Tls()
            if settings.server_name:
                channel_options.append(("grpc.ssl_target_name_override", settings.server_name))
            credentials = settings.credentials()
        self.channels = [
            grpc.secure_channel(target, credentials, channel_options)
            if credentials is not None
            else grpc.insecure_channel(target, channel_options)
            for _ in range(connections)
        ]
        self.channel = self.channels[0]
        self._stubs = [pb_grpc.RecommenderServiceStub(c) for c in self.channels]
        self._turns = itertools.count()  # next() is atomic under the GIL: thread-safe turns

    @property
    def stub(self) -> pb_grpc.RecommenderServiceStub:
        """The stub of the connection whose turn it is (round robin, one turn per call)."""
        return self._stubs[next(self._turns) % len(self._stubs)]

    def __enter__(self) -> RecommenderClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for channel in self.channels:
            channel.close()

    def _call(self, method: Callable[..., Reply], request: Any, timeout: float | None) -> Reply:
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    # --- the RPCs ------------------------------------------------------------------------
    def recommend(
        self,
        user_id: str,
        k: int = 10,
        categories: Sequence[str] = (),
        exclude: Sequence[str] = (),
        diversity: float | None = None,
        *,
        context: pb.RequestContext | None = None,
        repeat_policy: pb.RepeatPolicy | None = None,
        item_filter: pb.ItemFilter | None = None,
        business_rules: pb.BusinessRules | None = None,
        timeout: float | None = None,
    ) -> pb.RecommendResponse:
        """Top-k items for ``user_id`` (an unknown user gets a cold-start answer). ``context``
        says where they are shown: ``current_item_id`` for a "more like this" page, or
        ``session_id`` with ``user_id=""`` for an anonymous visitor. Send the reply's
        ``recommendation_id`` back on the events that follow it. ``repeat_policy`` lets items
        seen before come back, ``item_filter`` adds attribute conditions, ``business_rules``
        boosts, buries and pins items."""
        request = pb.RecommendRequest(
            user_id=user_id,
            k=k,
            categories=categories,
            exclude_item_ids=exclude,
            context=context,
            repeat_policy=repeat_policy,
            item_filter=item_filter,
            business_rules=business_rules,
        )
        if diversity is not None:
            request.diversity = diversity
        return self._call(self.stub.Recommend, request, timeout)

    def similar(
        self,
        item_id: str,
        k: int = 10,
        categories: Sequence[str] = (),
        exclude: Sequence[str] = (),
        *,
        timeout: float | None = None,
    ) -> pb.SimilarItemsResponse:
        """The nearest neighbours of ``item_id`` (NotFoundError for an unknown item)."""
        request = pb.SimilarItemsRequest(
            item_id=item_id, k=k, categories=categories, exclude_item_ids=exclude
        )
        return self._call(self.stub.SimilarItems, request, timeout)

    def profile(self, user_id: str, *, timeout: float | None = None) -> pb.GetUserProfileResponse:
        """What the platform knows of ``user_id`` (NotFoundError for an unknown user)."""
        request = pb.GetUserProfileRequest(user_id=user_id)
        return self._call(self.stub.GetUserProfile, request, timeout)

    def ingest(
        self, events: Sequence[pb.Event], *, timeout: float | None = None
    ) -> pb.IngestEventsResponse:
        """Store a batch of events; empty idempotency keys are filled in place first."""
        fill_idempotency_keys(events)
        request = pb.IngestEventsRequest(events=events)
        return self._call(self.stub.IngestEvents, request, timeout)

    def ingest_stream(
        self,
        events: Iterable[pb.Event],
        batch_size: int = STREAM_BATCH,
        *,
        timeout: float | None = None,
    ) -> pb.StreamIngestEventsResponse:
        """Stream events (any iterable, consumed lazily) in messages of ``batch_size``; one
        reply when the stream ends. Keys are filled as events are sent, so on an error the
        caller may resend the same ``Event`` objects and the gateway counts each once."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        return self._call(self.stub.StreamIngestEvents, _batches(events, batch_size), timeout)

    def upsert_items(
        self, items: Sequence[pb.Item], *, timeout: float | None = None
    ) -> pb.UpsertItemsResponse:
        """Add or replace catalogue items (recommendable once this returns)."""
        return self._call(self.stub.UpsertItems, pb.UpsertItemsRequest(items=items), timeout)

    def delete_user(self, user_id: str, *, timeout: float | None = None) -> pb.DeleteUserResponse:
        """Forget everything about ``user_id`` (never retried automatically)."""
        request = pb.DeleteUserRequest(user_id=user_id)
        return self._call(self.stub.DeleteUser, request, timeout)

    def get_item(self, item_id: str, *, timeout: float | None = None) -> pb.Item:
        """One catalogue item (NotFoundError for an unknown item)."""
        request = pb.GetItemRequest(item_id=item_id)
        return self._call(self.stub.GetItem, request, timeout).item

    def list_items(
        self, page_size: int = 0, page_token: str = "", *, timeout: float | None = None
    ) -> pb.ListItemsResponse:
        """One page of the catalogue in item id order (``page_size`` 0: the server's 100);
        pass its ``next_page_token`` for the next page (empty on the last)."""
        request = pb.ListItemsRequest(page_size=page_size, page_token=page_token)
        return self._call(self.stub.ListItems, request, timeout)

    def iter_items(self, page_size: int = 0, *, timeout: float | None = None) -> Iterator[pb.Item]:
        """Every catalogue item, page by page (each page its own call and deadline)."""
        token = ""
        while True:
            page = self.list_items(page_size, token, timeout=timeout)
            yield from page.items
            token = page.next_page_token
            if not token:
                return

    def delete_item(self, item_id: str, *, timeout: float | None = None) -> pb.DeleteItemResponse:
        """Remove an item from the catalogue (never retried automatically)."""
        request = pb.DeleteItemRequest(item_id=item_id)
        return self._call(self.stub.DeleteItem, request, timeout)

    def rank_items(
        self,
        user_id: str,
        item_ids: Sequence[str],
        *,
        context: pb.RequestContext | None = None,
        repeat_policy: pb.RepeatPolicy | None = None,
        item_filter: pb.ItemFilter | None = None,
        business_rules: pb.BusinessRules | None = None,
        timeout: float | None = None,
    ) -> pb.RankItemsResponse:
        """``item_ids`` (your candidates) ordered for ``user_id`` by the gateway's ranker,
        best first; ids not in the catalogue come back in ``unknown_item_ids``. ``context``
        (``surface``, ``device``), ``repeat_policy``, ``item_filter`` and ``business_rules``
        apply as in :meth:`recommend` (with the surface's configured rules); candidates
        they leave out come back in ``filtered_item_ids``."""
        request = pb.RankItemsRequest(
            user_id=user_id,
            item_ids=item_ids,
            context=context,
            repeat_policy=repeat_policy,
            item_filter=item_filter,
            business_rules=business_rules,
        )
        return self._call(self.stub.RankItems, request, timeout)

    def serving(self, timeout: float = 1.0) -> bool:
        """True when the gateway's health service answers SERVING on every connection (each
        may reach another process or pod); False on any error."""
        try:
            return all(
                channel.unary_unary(_HEALTH_CHECK)(b"", timeout=timeout) == _SERVING
                for channel in self.channels
            )
        except grpc.RpcError:
            return False


def _batches(events: Iterable[pb.Event], size: int) -> Iterator[pb.StreamIngestEventsRequest]:
    batch: list[pb.Event] = []
    for event in events:
        if not event.idempotency_key:
            event.idempotency_key = new_idempotency_key()
        batch.append(event)
        if len(batch) >= size:
            yield pb.StreamIngestEventsRequest(events=batch)
            batch = []
    if batch:
        yield pb.StreamIngestEventsRequest(events=batch)
