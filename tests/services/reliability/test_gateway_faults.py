"""The real gateway process on the shared event log: SIGKILL during ingestion, user deletion.

Each test starts its own gateway (own port, own log file) in front of the session's
tritonserver, Milvus, nats-server and profile worker, so it can be killed and restarted
freely: the gateway keeps no state, everything acknowledged is in JetStream.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from ops.processes import ManagedProcess, free_port, gateway_process
from ops.reliability_report import Scenario, record
from ops.stack import LocalStack, gateway_serving
from services.api import pb, pb_grpc
from services.events.log import EventLog

pytestmark = pytest.mark.integration
TIMEOUT_S = 10.0


class Gateway:
    """One gateway process with its own port, restartable on the same one."""

    def __init__(self, stack: LocalStack, directory: Path) -> None:
        self.port = free_port()
        self.stack = stack
        self.var_dir = directory
        self.env = {
            **stack.env(),
            "RECSYS_GRPC_PORT": str(self.port),
            "RECSYS_METRICS_PORT": "0",
        }
        self.proc: ManagedProcess | None = None
        self.channel: grpc.Channel | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.var_dir / "logs" / "gateway.log"

    def start(self) -> pb_grpc.RecommenderServiceStub:
        self.proc = gateway_process(self.env, self.var_dir).start()
        self.proc.wait_ready(lambda: gateway_serving(self.target), 90)
        self.channel = grpc.insecure_channel(self.target)
        return pb_grpc.RecommenderServiceStub(self.channel)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.proc is not None:
            self.proc.stop()

    def logged_events(self, user: str) -> int:
        """The user's events still in the event log's stream."""

        async def count() -> int:
            log = EventLog(self.stack.settings)
            await log.connect()
            try:
                return len(await log.user_events(user, 0, 1000))
            finally:
                await log.close()

        return asyncio.run(count())


@pytest.fixture()
def gateway(stack: LocalStack, tmp_path: Path) -> Iterator[Gateway]:
    g = Gateway(stack, tmp_path)
    yield g
    g.stop()


def click(user: str, item: int, key: str) -> pb.Event:
    return pb.Event(
        user_id=user, item_id=str(item), event_type=pb.EVENT_TYPE_CLICK, idempotency_key=key
    )


def wait_for(predicate: object, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.25)
    return False


def test_acknowledged_events_survive_gateway_sigkill(gateway: Gateway, store: Any) -> None:
    stub = gateway.start()
    run = uuid.uuid4().hex[:8]
    users = [f"crash-{run}-{u}" for u in range(4)]
    batches = [
        [click(users[e % 4], 1 + b * 8 + e, f"{run}-{b}-{e}") for e in range(8)] for b in range(40)
    ]
    acked: list[int] = []
    stop = threading.Event()
    report = Scenario("gateway SIGKILL during ingestion, restart, client retries all")

    def writer() -> None:
        for b, events in enumerate(batches):
            if stop.is_set():
                return
            try:
                stub.IngestEvents(pb.IngestEventsRequest(events=events), timeout=TIMEOUT_S)
                acked.append(b)
                report.answer("OK")
            except grpc.RpcError as exc:
                report.answer(exc.code().name)
                return  # the gateway died under this call: not acknowledged

    thread = threading.Thread(target=writer)
    thread.start()
    assert wait_for(lambda: len(acked) >= 5, 60), "no ingestion progress"
    assert wait_for(lambda: len(acked) >= 12, 60)
    gateway.kill()  # SIGKILL, mid-stream
    stop.set()
    thread.join(timeout=30)

    restarted = time.monotonic()
    stub = gateway.start()  # same port; what was acknowledged is in JetStream
    expected: dict[str, set[str]] = {u: set() for u in users}
    for b in acked:
        for e in batches[b]:
            expected[e.user_id].add(e.item_id)

    def missing() -> dict[str, set[str]]:
        out = {}
        for user, items in expected.items():
            row = store.get_user(user, 5, with_vector=False)
            gap = items - set(row["recent_items"] if row else [])
            if gap:
                out[user] = gap
        return out

    replayed = wait_for(lambda: not missing(), 60)
    report.recovery_s = time.monotonic() - restarted
    report.acknowledged = sum(len(items) for items in expected.values())
    report.found = report.acknowledged - sum(len(gap) for gap in missing().values())
    duplicates_ok = True
    for b, events in enumerate(batches):  # a client retrying everything, with the same keys
        reply = stub.IngestEvents(pb.IngestEventsRequest(events=events), timeout=TIMEOUT_S)
        report.answer("OK")
        if b in acked:
            duplicates_ok &= reply.duplicate_count == len(events)
    record(report)
    assert replayed, f"acknowledged events lost: {missing()}"
    assert duplicates_ok, "a retried acknowledged batch was counted again"


def test_deleted_user_leaves_nothing_behind(gateway: Gateway) -> None:
    stub = gateway.start()
    user = f"forget-me-{uuid.uuid4().hex[:8]}"
    events = [click(user, i, f"{user}-{i}") for i in range(1, 6)]
    stub.IngestEvents(pb.IngestEventsRequest(events=events), timeout=TIMEOUT_S)
    assert gateway.logged_events(user) == len(events)
    assert stub.GetUserProfile(pb.GetUserProfileRequest(user_id=user), timeout=5).history_size

    assert stub.DeleteUser(pb.DeleteUserRequest(user_id=user), timeout=TIMEOUT_S).existed
    with pytest.raises(grpc.RpcError) as err:
        stub.GetUserProfile(pb.GetUserProfileRequest(user_id=user), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    assert stub.Recommend(pb.RecommendRequest(user_id=user), timeout=5).cold_start
    assert gateway.logged_events(user) == 0, "the event log still holds the user's events"
    gateway.stop()  # flush the log
    # Every file this gateway wrote (logs, and whatever else Gateway.env points into
    # its directory): no raw trace of the user. Milvus is checked through its API above.
    leaks = [
        str(p.relative_to(gateway.var_dir))
        for p in gateway.var_dir.rglob("*")
        if p.is_file() and user.encode() in p.read_bytes()
    ]
    assert not leaks, f"the deleted user's id is still in {leaks}"
