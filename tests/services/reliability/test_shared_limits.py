"""Rate limits shared by every gateway process through the event log's key-value store, on a
real nats-server: a client's burst is spent once across processes, leases cover several
calls, and a log that does not answer leaves each process limiting on its own."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from core.config import Settings
from ops.processes import free_port
from services.api import pb_grpc
from services.events.log import BlockingEventLog, EventLog
from services.reliability.ratelimit import SharedBuckets, TokenBuckets, client_key
from tests.nats_server import nats_settings, on_log
from tests.services.reliability.conftest import running_server
from tests.services.reliability.test_limits import _call

__all__ = ["nats_settings"]

Code = grpc.StatusCode
pytestmark = pytest.mark.integration


@contextlib.contextmanager
def processes(settings: Settings, n: int) -> Iterator[list[BlockingEventLog]]:
    """``n`` connections to the log, as ``n`` gateway processes hold them."""
    logs = [BlockingEventLog(settings, f"test-gateway-{i}") for i in range(n)]
    try:
        for events in logs:
            assert events.wait_connected(20)
        yield logs
    finally:
        for events in logs:
            events.close()


def _buckets(events: BlockingEventLog, rate: float, burst: int, now: list[float]) -> SharedBuckets:
    local = TokenBuckets(rate, burst)
    return SharedBuckets(events, "recsys_rate_limits", local, clock=lambda: now[0])


def test_processes_spend_one_burst(nats_settings: Settings) -> None:
    """Two processes, calls alternating, the clock still: five grants in all (each process
    alone would grant five), then a wait of one token's refill on either."""
    now = [1_000.0]
    with processes(nats_settings, 2) as (one, two):
        a, b = _buckets(one, 1.0, 5, now), _buckets(two, 1.0, 5, now)
        waits = [(a if i % 2 else b).take("etl") for i in range(8)]
        assert waits[:5] == [0.0] * 5
        assert waits[5:] == [1.0] * 3
        assert a.take("web") == 0.0  # clients are independent
        now[0] += 1.0
        assert b.take("etl") == 0.0  # one token back after 1/rate, for any process
        assert a.take("etl") == pytest.approx(1.0)


def test_a_lease_covers_several_calls_and_never_more_than_the_burst(
    nats_settings: Settings,
) -> None:
    """At 100 calls/s a process takes a tenth of a second's tokens (10) per write; what two
    processes grant with the clock still is the burst exactly, and the leased tokens are
    spent without the log (the stored value moves once per lease)."""
    now = [1_000.0]
    with processes(nats_settings, 2) as (one, two):
        a, b = _buckets(one, 100.0, 25, now), _buckets(two, 100.0, 25, now)
        assert a.take("etl") == 0.0  # leases 10, spends 1
        stored = on_log(nats_settings, lambda log: _stored(log, "etl"))
        assert stored == (15.0, 1)
        assert [b.take("etl") for _ in range(15)] == [0.0] * 15  # 10 then the last 5
        assert b.take("etl") == pytest.approx(0.01)  # empty: one token in 1/100 s
        assert [a.take("etl") for _ in range(9)] == [0.0] * 9  # its lease, no write
        assert a.take("etl") == pytest.approx(0.01)
        assert on_log(nats_settings, lambda log: _stored(log, "etl"))[1] == 3


def test_a_value_that_does_not_parse_is_a_full_bucket(nats_settings: Settings) -> None:
    async def garble(log: EventLog) -> None:
        kv = await log.bucket("recsys_rate_limits", create=True)
        await kv.put(client_key("etl"), b"not a bucket")

    on_log(nats_settings, garble)
    with processes(nats_settings, 1) as (one,):
        buckets = _buckets(one, 1.0, 2, [1_000.0])
        assert [buckets.take("etl") for _ in range(3)] == [0.0, 0.0, 1.0]


def test_without_the_log_each_process_limits_alone(tmp_path: Path) -> None:
    """Nothing listens at the NATS address: every call is decided by the process's own
    bucket at once (no wait for the log), as without sharing."""
    settings = Settings(nats_urls=f"nats://127.0.0.1:{free_port()}", var_dir=tmp_path)
    events = BlockingEventLog(settings, "test-gateway")
    try:
        buckets = _buckets(events, 1.0, 2, [1_000.0])
        assert [buckets.take("etl") for _ in range(3)] == [0.0, 0.0, pytest.approx(1.0, 0.1)]
    finally:
        events.close()


def test_two_gateways_admit_a_client_once(nats_settings: Settings) -> None:
    """Through the real interceptors of two servers: a burst of 4 at 1 call/s is four OKs
    in all, not four per server; with rate_limit_shared off it is four per server."""
    settings = nats_settings.model_copy(
        update={"rate_limit_rps": 1.0, "rate_limit_burst": 4, "grpc_workers": 4}
    )
    for shared, expected in ((True, 4), (False, 8)):
        s = settings.model_copy(update={"rate_limit_shared": shared})
        with (
            processes(s, 2) as logs,
            running_server(s, events=logs[0]) as (first, _),
            running_server(s, events=logs[1]) as (second, _),
            grpc.insecure_channel(first) as c1,
            grpc.insecure_channel(second) as c2,
        ):
            stubs = [pb_grpc.RecommenderServiceStub(c) for c in (c1, c2)]
            results = [_call(stubs[i % 2]) for i in range(10)]
            ok = [r for r in results if r == Code.OK]
            assert len(ok) == expected, (shared, results)
            refused = [r for r in results if r != Code.OK]
            assert all(r.code() == Code.RESOURCE_EXHAUSTED for r in refused)  # type: ignore[union-attr]
        # a new bucket per round: the shared one of the first round would refuse the second
        settings = settings.model_copy(update={"rate_limit_bucket": "recsys_rate_limits_2"})


async def _stored(log: EventLog, client: str) -> tuple[float, int]:
    """The shared bucket's tokens and revision for ``client``."""
    kv = await log.bucket("recsys_rate_limits")
    entry = await kv.get(client_key(client))
    return float((entry.value or b"").split()[0]), int(entry.revision or 0)
