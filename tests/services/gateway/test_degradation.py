"""Dependencies going away mid-test: answers stay within the deadline, flagged, then recover.

Each test restarts what it stopped on the same ports, so the session's stack is whole again
for the tests after it.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.request

import grpc
import pytest
from recsys_client import RecommenderClient

from ops.stack import LocalStack
from services.api import pb, pb_grpc

pytestmark = pytest.mark.integration
DEADLINE_S = 1.5


def _recommend(stack: LocalStack, user: str) -> tuple[pb.RecommendResponse, float]:
    with grpc.insecure_channel(stack.gateway_target) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        start = time.monotonic()
        reply = stub.Recommend(pb.RecommendRequest(user_id=user, k=5), timeout=DEADLINE_S)
        return reply, time.monotonic() - start


def _until(check, timeout: float) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.25)
    raise AssertionError(f"not recovered within {timeout}s")


def test_triton_down_gives_degraded_answers_then_recovers(stack: LocalStack) -> None:
    assert not _recommend(stack, "1")[0].degraded
    stack.processes["triton"].kill()
    try:
        for _ in range(5):
            reply, took = _recommend(stack, "1")
            assert reply.degraded and "ranker unavailable" in reply.degraded_reason
            assert pb.DEGRADED_REASON_FEATURE_RANKER_UNAVAILABLE in reply.degraded_reasons
            assert len(reply.items) == 5  # answered from retrieval order
            assert took < DEADLINE_S
    finally:
        stack.start_triton()
    recovered = _until(lambda: not _recommend(stack, "1")[0].degraded, 10)
    assert recovered < 10


def test_a_hung_triton_costs_the_deadline_not_a_hang(
    client: RecommenderClient, stack: LocalStack
) -> None:
    """With Triton frozen (SIGSTOP: it holds every connection and never answers), a
    Recommend with a 2 s deadline still answers inside it: the model calls give up at the
    time they were given (the sequence model a share of retrieval's), and the retrieval
    order comes back, degraded, saying which models were missing. (A deadline already
    passed is ``DEADLINE_EXCEEDED``: ``test_limits`` on a real server, ``test_profile_read``
    for the answer that came too late.)"""
    triton = stack.processes["triton"]
    os.kill(triton.pid, signal.SIGSTOP)
    try:  # a hang, or an answer past the deadline, raises DEADLINE_EXCEEDED here
        reply = client.recommend("1", k=10, timeout=2.0)
    finally:
        os.kill(triton.pid, signal.SIGCONT)
    assert reply.degraded and len(reply.items) == 10
    assert pb.DEGRADED_REASON_FEATURE_RANKER_UNAVAILABLE in reply.degraded_reasons
    # the hung sequence model cost its own source, not the Milvus reads of the others
    assert pb.DEGRADED_REASON_VECTOR_STORE_UNAVAILABLE not in reply.degraded_reasons
    assert {"ann", "co_occurrence"} & {s.source for s in reply.items}
    _until(lambda: not client.recommend("1", k=10).degraded, 30)  # Triton answers again


def test_milvus_down_answers_from_cached_popularity_then_recovers(stack: LocalStack) -> None:
    stack.processes["milvus"].stop()
    try:
        reply, took = _recommend(stack, "1")
        assert reply.degraded and "milvus unavailable" in reply.degraded_reason
        assert list(reply.degraded_reasons) == [pb.DEGRADED_REASON_VECTOR_STORE_UNAVAILABLE]
        assert [s.source for s in reply.items] == ["popular"] * 5
        assert took < DEADLINE_S
    finally:
        stack.start_milvus()
    _until(lambda: not _recommend(stack, "1")[0].degraded, 30)
    reply, _ = _recommend(stack, "1")
    assert {s.source for s in reply.items} - {"popular"}  # personal again


def test_stream_ingest_and_metrics(stack: LocalStack, client: RecommenderClient) -> None:
    messages = [
        pb.StreamIngestEventsRequest(
            events=[pb.Event(user_id="streamer", item_id=i, event_type=pb.EVENT_TYPE_CLICK)]
        )
        for i in ("10", "11")
    ]
    reply = client.stub.StreamIngestEvents(iter(messages), timeout=20)
    assert reply.accepted_count == 2
    assert client.profile("streamer").history_size == 2
    assert client.recommend("streamer", k=3).items
    with pytest.raises(grpc.RpcError):
        client.recommend("bad id")
    url = f"http://127.0.0.1:{stack.ports.gateway_metrics}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert 'recsys_requests_total{code="OK",method="Recommend"}' in text
    assert 'recsys_requests_total{code="INVALID_ARGUMENT",method="Recommend"}' in text
    assert 'recsys_stage_seconds_count{stage="ranking"}' in text
    assert "recsys_degraded_total" in text
