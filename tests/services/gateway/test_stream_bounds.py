"""StreamIngestEvents' bounds on a real gateway process (beside the session stack's, on its
Triton, Milvus and NATS, with small limits): the message past the events limit is refused
and the events before it are stored; a client that goes quiet is cut at the idle timeout."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from recsys_client import DeadlineExceededError, InvalidArgumentError, RecommenderClient, pb

from ops.processes import free_port, gateway_process
from ops.stack import LocalStack

pytestmark = pytest.mark.integration
MAX_EVENTS, IDLE_S = 5, 1.0


@pytest.fixture(scope="module")
def bounded(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work: Path = tmp_path_factory.mktemp("bounded-gateway")
    port = free_port()
    env = {
        **stack.env(),
        "RECSYS_GRPC_PORT": str(port),
        "RECSYS_METRICS_PORT": str(free_port()),
        "RECSYS_EXPOSURE_LOG": str(work / "exposures.jsonl"),
        "RECSYS_MAX_EVENTS_PER_STREAM": str(MAX_EVENTS),
        "RECSYS_STREAM_IDLE_TIMEOUT_S": str(IDLE_S),
    }
    target = f"127.0.0.1:{port}"
    proc = gateway_process(env, work, "gateway-bounded.log").start()
    try:
        with RecommenderClient(target, 20) as probe:
            proc.wait_ready(probe.serving, 90)
        yield target
    finally:
        proc.stop()


def _events(user: str, n: int) -> list[pb.Event]:
    return [
        pb.Event(user_id=user, item_id=str(i + 1), event_type=pb.EVENT_TYPE_VIEW) for i in range(n)
    ]


def test_events_past_the_stream_limit_are_refused_the_rest_stored(bounded: str) -> None:
    user = f"stream-{uuid.uuid4().hex[:8]}"
    events = _events(user, MAX_EVENTS + 2)
    with RecommenderClient(bounded, 20) as client:
        with pytest.raises(InvalidArgumentError) as excinfo:
            client.ingest_stream(iter(events), batch_size=3)  # 3 + 3 > 5: the second refused
        err = excinfo.value
        assert err.reason == "STREAM_TOO_LONG" and err.field_violations[0][0] == "events"
        assert f"at most {MAX_EVENTS} events" in err.message
        resent = client.ingest(events[:3])  # the first message was stored: duplicates now
        assert (resent.accepted_count, resent.duplicate_count) == (0, 3)
        ok = client.ingest_stream(iter(events[3:]), batch_size=3)
        assert ok.accepted_count == len(events) - 3


def test_a_quiet_client_is_cut_at_the_idle_timeout(bounded: str) -> None:
    user = f"quiet-{uuid.uuid4().hex[:8]}"
    resume = threading.Event()
    sent = _events(user, 2)

    def quiet() -> Iterator[pb.Event]:
        yield from sent  # keys filled in place as they go
        resume.wait(10)  # silence past the idle timeout

    with RecommenderClient(bounded, 20) as client:
        start = time.monotonic()
        with pytest.raises(DeadlineExceededError) as excinfo:
            client.ingest_stream(quiet(), batch_size=2)
        took = time.monotonic() - start
        resume.set()
        assert excinfo.value.reason == "STREAM_IDLE"
        assert IDLE_S <= took < IDLE_S + 5
        stored = client.ingest(sent)  # acknowledged before the silence: duplicates now
        assert (stored.accepted_count, stored.duplicate_count) == (0, 2)
