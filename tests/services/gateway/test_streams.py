"""Client streams are bounded: each message is awaited at most the idle timeout, and a stream
waiting for its client holds no concurrency slot (real gRPC server, the real interceptors and
the servicer's own error mapping, a tiny servicer instead of Triton and Milvus)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from core.config import Settings
from services.api import pb, pb_grpc
from services.deadline import Deadline
from services.gateway.servicer import rpc
from services.gateway.streams import client_messages
from tests.services.reliability.conftest import FakeServicer, running_server

IDLE_S = 0.5


class StreamingServicer(FakeServicer):
    """``StreamIngestEvents`` reading its stream as the gateway's does."""

    @rpc
    def StreamIngestEvents(self, request_iterator: Any, context: Any) -> Any:
        messages = client_messages(request_iterator, IDLE_S, Deadline.after(10))
        count = sum(len(m.events) for m in messages)
        return pb.StreamIngestEventsResponse(accepted_count=count)


def _event() -> pb.Event:
    return pb.Event(user_id="u", item_id="i", event_type=pb.EVENT_TYPE_CLICK)


def _reason(err: grpc.RpcError) -> str:
    trailers = dict(err.trailing_metadata() or ())  # type: ignore[attr-defined]
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    info = error_details_pb2.ErrorInfo()
    assert any(d.Unpack(info) for d in status.details if d.Is(info.DESCRIPTOR))
    return str(info.reason)


def _readers() -> int:
    return sum(t.name == "stream-reader" for t in threading.enumerate())


def test_idle_stream_ends_with_deadline_exceeded_and_its_reader() -> None:
    settings = Settings(grpc_workers=8, max_in_flight=4)
    server = running_server(settings, StreamingServicer())
    with server as (target, _), grpc.insecure_channel(target) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        release = threading.Event()

        def stalled() -> Iterator[pb.StreamIngestEventsRequest]:
            yield pb.StreamIngestEventsRequest(events=[_event()])
            release.wait(10)  # then nothing: the client went quiet

        start = time.monotonic()
        try:
            stub.StreamIngestEvents(stalled(), timeout=10)
            raise AssertionError("an idle stream must not succeed")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
            assert "no message within" in err.details()  # type: ignore[attr-defined]
            assert _reason(err) == "STREAM_IDLE"
        finally:
            release.set()
        assert IDLE_S <= time.monotonic() - start < 5
        reply = stub.StreamIngestEvents(
            iter([pb.StreamIngestEventsRequest(events=[_event()] * 3)] * 2), timeout=10
        )
        assert reply.accepted_count == 6
    deadline = time.monotonic() + 5
    while _readers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _readers() == 0


def test_streams_waiting_for_their_client_hold_no_slot() -> None:
    """Twice as many open streams as work slots, each between two messages, and unary calls
    still run at once; then every stream completes with all its events."""
    settings = Settings(grpc_workers=12, max_in_flight=2, max_queue_wait_s=0.2)
    server = running_server(settings, StreamingServicer())
    with server as (target, _), grpc.insecure_channel(target) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        gate = threading.Event()

        def paused() -> Iterator[pb.StreamIngestEventsRequest]:
            yield pb.StreamIngestEventsRequest(events=[_event()])
            gate.wait(IDLE_S * 0.6)  # waits, but within the idle timeout
            yield pb.StreamIngestEventsRequest(events=[_event()])

        futures = [stub.StreamIngestEvents.future(paused(), timeout=10) for _ in range(4)]
        time.sleep(0.1)  # the streams are open and waiting
        for _ in range(4):
            stub.Recommend(pb.RecommendRequest(user_id="u"), timeout=2)
        assert [f.result().accepted_count for f in futures] == [2, 2, 2, 2]
