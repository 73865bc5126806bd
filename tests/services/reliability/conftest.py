"""An in-process gateway-shaped server on a free loopback port: the real reliability
interceptors in front of a tiny servicer, so auth, limits and TLS are tested without Triton
or Milvus."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from core.config import Settings
from services.api import pb, pb_grpc
from services.events.log import BlockingEventLog
from services.reliability import current_principal, interceptors, max_concurrent_rpcs


class FakeServicer(pb_grpc.RecommenderServiceServicer):
    """Answers every RPC at once (or after ``delay``), naming the caller it saw."""

    def __init__(self) -> None:
        self.delay = 0.0
        self.calls = 0
        self.peak = 0
        self._running = 0
        self._lock = threading.Lock()

    def _enter(self) -> str:
        with self._lock:
            self.calls += 1
            self._running += 1
            self.peak = max(self.peak, self._running)
        if self.delay:
            time.sleep(self.delay)
        with self._lock:
            self._running -= 1
        principal = current_principal()
        return principal.client if principal else ""

    def Recommend(self, request: Any, context: Any) -> pb.RecommendResponse:
        return pb.RecommendResponse(model_version=self._enter())

    def SimilarItems(self, request: Any, context: Any) -> pb.SimilarItemsResponse:
        self._enter()
        return pb.SimilarItemsResponse()

    def GetUserProfile(self, request: Any, context: Any) -> pb.GetUserProfileResponse:
        return pb.GetUserProfileResponse(user_id=self._enter())

    def IngestEvents(self, request: Any, context: Any) -> pb.IngestEventsResponse:
        self._enter()
        return pb.IngestEventsResponse(accepted_count=len(request.events))

    def StreamIngestEvents(self, request_iterator: Any, context: Any) -> Any:
        self._enter()
        n = sum(len(m.events) for m in request_iterator)
        return pb.StreamIngestEventsResponse(accepted_count=n)

    def UpsertItems(self, request: Any, context: Any) -> pb.UpsertItemsResponse:
        self._enter()
        return pb.UpsertItemsResponse(upserted_count=len(request.items))

    def DeleteUser(self, request: Any, context: Any) -> pb.DeleteUserResponse:
        self._enter()
        return pb.DeleteUserResponse(existed=True)


@contextlib.contextmanager
def running_server(
    settings: Settings,
    servicer: FakeServicer | None = None,
    credentials: grpc.ServerCredentials | None = None,
    events: BlockingEventLog | None = None,
) -> Iterator[tuple[str, FakeServicer]]:
    """Start the interceptors + fake servicer the way ``server.build`` does (rate limits
    shared through ``events`` when given); stop on exit."""
    servicer = servicer or FakeServicer()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.grpc_workers),
        interceptors=interceptors(settings, events),
        maximum_concurrent_rpcs=max_concurrent_rpcs(settings),
    )
    pb_grpc.add_RecommenderServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(0).wait()


@pytest.fixture()
def base_settings(tmp_path: Any) -> Settings:
    return Settings(grpc_workers=8, max_in_flight=4)
