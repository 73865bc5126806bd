"""The shared event log with real processes: nats-server, profile workers, gateway replicas.

Retries through another replica count once, a poison event is dead-lettered while the
user's other events apply, ``DeleteUser`` through one replica while the worker holds pending
events leaves nothing, and with 3 gateway replicas and 2 workers, SIGKILL of a gateway, a
worker and nats-server under load loses no acknowledged event and applies none twice.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from ops.processes import ManagedProcess, free_port, gateway_process
from ops.reliability_report import Scenario, record
from ops.stack import LocalStack, gateway_serving
from services.api import pb, pb_grpc
from services.events.log import EventLog
from services.profile_worker.dead_letters import list_dead
from tests.services.events.helpers import click, wait_for

pytestmark = pytest.mark.integration
TIMEOUT_S = 10.0


def on_log(stack: LocalStack, work: Callable[[EventLog], Any]) -> Any:
    """Run ``work`` with a fresh connection to the stack's event log."""

    async def run() -> Any:
        log = EventLog(stack.settings)
        await log.connect()
        try:
            return await work(log)
        finally:
            await log.close()

    return asyncio.run(run())


class Replica:
    """Another gateway process on the same log, Milvus and Triton (on its own fixed port,
    so that it can be killed and started again)."""

    def __init__(self, stack: LocalStack, var_dir: Path, name: str) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.env = {**stack.env(), "RECSYS_GRPC_PORT": str(self.port), "RECSYS_METRICS_PORT": "0"}
        self.var_dir, self.name = var_dir, name
        self.proc: ManagedProcess | None = None

    def start(self) -> Replica:
        self.proc = gateway_process(self.env, self.var_dir, f"{self.name}.log").start()
        self.proc.wait_ready(lambda: gateway_serving(self.target), 90)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


@pytest.fixture(scope="module")
def replicas(
    stack: LocalStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Replica]]:
    """Gateway replicas B and C beside the stack's (A)."""
    started: list[Replica] = []
    try:
        for name in ("gateway-b", "gateway-c"):
            started.append(Replica(stack, tmp_path_factory.mktemp(name), name).start())
        yield started
    finally:
        for replica in started:
            replica.stop()


@pytest.fixture(scope="module")
def stubs(
    stack: LocalStack, replicas: list[Replica]
) -> Iterator[list[pb_grpc.RecommenderServiceStub]]:
    """Stubs on replicas A, B and C."""
    targets = [stack.gateway_target, *(r.target for r in replicas)]
    channels = [grpc.insecure_channel(t) for t in targets]
    yield [pb_grpc.RecommenderServiceStub(c) for c in channels]
    for c in channels:
        c.close()


@pytest.fixture(scope="module")
def second_worker(stack: LocalStack) -> Iterator[str]:
    """A second profile worker on the same durable consumer."""
    stack.start_worker("profile-worker-2")
    yield "profile-worker-2"
    proc = stack.processes.pop("profile-worker-2", None)
    if proc is not None:
        proc.stop()


async def logged_events(log: EventLog, user: str) -> list[tuple[int, bytes]]:
    return await log.user_events(user, 0, 10_000)


def profile(store: Any, user: str) -> dict[str, Any] | None:
    return store.get_user(user, 5, with_vector=False)  # type: ignore[no-any-return]


def test_retry_through_another_replica_counts_once(
    stubs: list[pb_grpc.RecommenderServiceStub], store: Any
) -> None:
    a, b = stubs[:2]
    user = f"idem-{uuid.uuid4().hex[:8]}"
    events = [click(user, "1", f"{user}-k1"), click(user, "2", f"{user}-k2")]
    first = a.IngestEvents(pb.IngestEventsRequest(events=events), timeout=TIMEOUT_S)
    assert (first.accepted_count, first.duplicate_count) == (2, 0)
    retry = b.IngestEvents(pb.IngestEventsRequest(events=events), timeout=TIMEOUT_S)
    assert (retry.accepted_count, retry.duplicate_count) == (0, 2)
    row = profile(store, user)  # read-your-writes: applied before IngestEvents answered
    assert row is not None and row["history_size"] == 2, row
    assert set(row["recent_items"]) == {"1", "2"}


def test_poison_event_is_dead_lettered_and_the_rest_applies(stack: LocalStack, store: Any) -> None:
    user = f"poison-{uuid.uuid4().hex[:8]}"
    poison = click(user, "x" * 128 + "\n", f"{user}-bad")  # never passes the gateway
    good = [click(user, "3", f"{user}-a"), poison, click(user, "4", f"{user}-b")]
    on_log(stack, lambda log: log.publish(good))
    assert wait_for(lambda: (profile(store, user) or {}).get("history_size") == 2, 30)
    assert set(profile(store, user)["recent_items"]) == {"3", "4"}  # type: ignore[index]
    dead = [
        d for d in asyncio.run(list_dead(stack.settings, 10_000)) if d.event.get("userId") == user
    ]
    assert len(dead) == 1 and "item_id" in dead[0].reason, dead
    assert on_log(stack, lambda log: log.user_events(user, 0, 100)) and all(
        b"x" * 128 not in payload
        for _, payload in on_log(stack, lambda log: log.user_events(user, 0, 100))
    )


def test_delete_user_with_pending_events_leaves_no_trace(
    stack: LocalStack, stubs: list[pb_grpc.RecommenderServiceStub], store: Any
) -> None:
    a, b = stubs[:2]
    user = f"gone-{uuid.uuid4().hex[:8]}"
    a.IngestEvents(pb.IngestEventsRequest(events=[click(user, "5", f"{user}-0")]), timeout=10)
    assert profile(store, user) is not None
    # the row is visible before the worker releases the user's lease: wait for the release,
    # or a worker stopped in between holds it for worker_lease_s and DeleteUser answers
    # UNAVAILABLE (retry), as it should
    revision = on_log(stack, lambda log: log.acquire_lease(user, "test", TIMEOUT_S))
    assert revision is not None
    on_log(stack, lambda log: log.release_lease(user, revision))
    worker = stack.processes["profile-worker"]
    assert worker.proc is not None
    worker.proc.send_signal(signal.SIGSTOP)  # the worker holds (and is handed) pending events
    try:
        pending = [click(user, str(i), f"{user}-{i}") for i in range(6, 12)]
        on_log(stack, lambda log: log.publish(pending))
        assert b.DeleteUser(pb.DeleteUserRequest(user_id=user), timeout=TIMEOUT_S).existed
    finally:
        worker.proc.send_signal(signal.SIGCONT)
    marker = f"marker-{uuid.uuid4().hex[:8]}"  # the worker caught up once this one applied
    a.IngestEvents(pb.IngestEventsRequest(events=[click(marker, "5", marker)]), timeout=30)
    assert wait_for(lambda: profile(store, marker) is not None, 30)
    assert profile(store, user) is None, "a pending event brought the deleted user back"
    assert on_log(stack, lambda log: log.user_events(user, 0, 100)) == []
    later = a.IngestEvents(
        pb.IngestEventsRequest(events=[click(user, "7", f"{user}-new")]), timeout=10
    )
    assert later.accepted_count == 1  # new data after deletion is a new profile
    row = profile(store, user)
    assert row is not None and row["history_size"] == 1, row


def test_sigkill_gateway_worker_and_nats_under_load_applies_each_acknowledged_event_once(
    stack: LocalStack,
    stubs: list[pb_grpc.RecommenderServiceStub],
    replicas: list[Replica],
    second_worker: str,
    store: Any,
) -> None:
    """3 gateway replicas, 2 profile workers: a client sends batches round-robin, retrying a
    batch with the same idempotency keys on the next replica; SIGKILL gateway C, then a
    worker, then nats-server, and start each again. Every acknowledged event is in the log
    once and in its profile once (history size and items), none is lost."""
    run = uuid.uuid4().hex[:8]
    users = [f"kill-{run}-{u}" for u in range(6)]
    batches = [
        [click(users[e % 6], f"{b}.{e}", f"{run}-{b}-{e}") for e in range(12)] for b in range(60)
    ]
    acked: set[int] = set()
    stop = threading.Event()
    engine = ", Milvus engine" if stack.settings.milvus_server == "engine" else ""
    report = Scenario(
        "event log: SIGKILL a gateway, a profile worker and nats-server under ingest load "
        f"(3 gateways, 2 workers{engine})"
    )
    gateway_c = replicas[1]

    def writer() -> None:  # a client retrying each batch with its keys, on the next replica
        for n, events in enumerate(batches):
            attempt = 0
            while not stop.is_set():
                stub = stubs[(n + attempt) % len(stubs)]
                try:
                    stub.IngestEvents(pb.IngestEventsRequest(events=events), timeout=TIMEOUT_S)
                    acked.add(n)
                    report.answer("OK")
                    break
                except grpc.RpcError as exc:
                    report.answer(exc.code().name)
                    attempt += 1
                    time.sleep(0.2)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert wait_for(lambda: len(acked) >= 8, 60), "no ingestion progress"
        assert gateway_c.proc is not None
        gateway_c.proc.kill()
        assert wait_for(lambda: len(acked) >= 16, 60)
        stack.processes["profile-worker"].kill()
        assert wait_for(lambda: len(acked) >= 24, 60)
        stack.processes["nats"].kill()
        time.sleep(1.0)
        restarted = time.monotonic()
        stack.start_nats()
        stack.start_worker()
        gateway_c.start()
        thread.join(timeout=180)
        assert not thread.is_alive(), "the client never got every batch acknowledged"
    finally:
        stop.set()
        thread.join(timeout=30)
    assert acked == set(range(len(batches)))
    expected = {u: {e.item_id for b in batches for e in b if e.user_id == u} for u in users}

    def exact() -> bool:
        rows = {u: profile(store, u) for u in users}
        sizes = [int((r or {}).get("history_size", 0)) for r in rows.values()]
        assert all(n <= len(expected[u]) for n, u in zip(sizes, users, strict=True)), sizes
        return sizes == [len(expected[u]) for u in users]

    applied = wait_for(exact, 90)
    report.recovery_s = time.monotonic() - restarted
    report.acknowledged = sum(len(b) for b in batches)
    report.found = sum(int((profile(store, u) or {}).get("history_size", 0)) for u in users)
    logged = {u: len(on_log(stack, functools.partial(logged_events, user=u))) for u in users}
    report.duplicates = sum(max(0, logged[u] - len(expected[u])) for u in users) + max(
        0, report.found - report.acknowledged
    )
    record(report)
    assert applied, {u: (profile(store, u) or {}).get("history_size") for u in users}
    for u in users:
        row = profile(store, u)
        assert row is not None and set(row["seen_items"]) == expected[u]
        assert logged[u] == len(expected[u]), "an acknowledged event was stored twice or lost"
