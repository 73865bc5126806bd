"""Pure parts of the event log and the worker: subject tokens, message ids, stamping, which
failures are permanent (dead-lettered at once) rather than retried, and what counts toward
dead-lettering the rest."""

from __future__ import annotations

import asyncio
import gc
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from pymilvus import MilvusException
from pymilvus.exceptions import ParamError

from core.config import Settings
from services.api import pb
from services.events.log import message_id, stamped, user_token
from services.inference.triton_client import InferenceUnavailable
from services.profile_worker.worker import (
    BACKOFF_S,
    OUTAGE_BACKOFF_S,
    Permanent,
    ProfileWorker,
    UserWork,
    is_permanent,
)
from services.vectors.store import StoreUnavailable


def test_user_tokens_are_stable_keyed_and_subject_safe() -> None:
    a = user_token("u42", b"key")
    assert a == user_token("u42", b"key") != user_token("u42", b"other")
    assert a != user_token("u43", b"key")
    assert user_token("u42") == user_token("u42", b"")  # no key: still the same everywhere
    assert a.isalnum() and "u42" not in a and len(a) == 33


def test_message_ids_scope_idempotency_keys_to_the_user() -> None:
    t1, t2 = user_token("a"), user_token("b")
    assert message_id(t1, "k") == message_id(t1, "k") != message_id(t2, "k")
    assert message_id(t1, "k") != message_id(t1, "k2")
    assert " " not in message_id(t1, "a key with spaces\nand lines")


def test_stamping_keeps_client_time_and_fills_missing() -> None:
    event = pb.Event(user_id="u", item_id="i", event_type=pb.EVENT_TYPE_VIEW)
    filled = stamped(event, 1_700_000_000_000)
    assert filled.event_time.ToMilliseconds() == 1_700_000_000_000
    assert not event.HasField("event_time")  # the caller's message is not changed
    assert stamped(filled, 5) is filled


def _wrapped(cause: Exception) -> StoreUnavailable:
    try:
        raise StoreUnavailable("Milvus upsert: ...") from cause
    except StoreUnavailable as exc:
        return exc


def test_refused_values_are_permanent_outages_are_not() -> None:
    assert is_permanent(Permanent("x"))
    assert is_permanent(_wrapped(ParamError(message="bad value")))
    assert is_permanent(_wrapped(MilvusException(code=1100, message="invalid parameter")))
    too_long = "the length (129) of 0th VarChar user_id exceeds max length (128)"
    assert is_permanent(_wrapped(MilvusException(code=65535, message=too_long)))
    assert not is_permanent(_wrapped(MilvusException(code=2, message="connection refused")))
    assert not is_permanent(_wrapped(ConnectionError("reset")))
    assert not is_permanent(TimeoutError())


class Trigger:
    """A JetStream message's interface the worker uses on a failure: metadata, nak, ack."""

    def __init__(self, delivered: int) -> None:
        self.metadata = SimpleNamespace(num_delivered=delivered)
        self.naks: list[float] = []
        self.acked = False

    async def nak(self, delay: float) -> None:
        self.naks.append(delay)

    async def ack(self) -> None:
        self.acked = True


class FailureCounts:
    """``EventLog.count_failure`` / ``clear_failures`` in memory, same semantics."""

    def __init__(self) -> None:
        self.counts: dict[str, tuple[int, int]] = {}

    async def count_failure(self, user_id: str, first_seq: int) -> int:
        seq, n = self.counts.get(user_id, (first_seq, 0))
        n = n + 1 if seq == first_seq else 1
        self.counts[user_id] = (first_seq, n)
        return n

    async def clear_failures(self, user_id: str) -> None:
        self.counts.pop(user_id, None)


def _worker(max_deliveries: int, dead: list[str]) -> ProfileWorker:
    worker = ProfileWorker.__new__(ProfileWorker)
    worker.settings = Settings(worker_max_deliveries=max_deliveries)
    worker.events = FailureCounts()  # type: ignore[assignment]

    async def record(user_id: str, seq: int, payload: bytes, reason: str) -> None:
        dead.append(reason)

    worker._dead = record  # type: ignore[method-assign]
    return worker


EVENT = (1, pb.Event(user_id="u", item_id="i", event_type=pb.EVENT_TYPE_CLICK))


def test_outages_are_waited_out_other_failures_dead_lettered() -> None:
    """A Triton or Milvus outage never dead-letters good events, however often they were
    delivered; another failure does at the ``worker_max_deliveries``-th failed apply."""
    dead: list[str] = []
    worker = _worker(3, dead)
    for exc in (InferenceUnavailable("triton down"), StoreUnavailable("milvus down")):
        trigger = Trigger(delivered=50)
        work = [UserWork("u", [trigger], None, [EVENT])]  # type: ignore[list-item]
        asyncio.run(worker._retry_or_dead(work, exc))
        assert trigger.naks == [OUTAGE_BACKOFF_S] and not trigger.acked and not dead
    for failure in range(1, 4):
        trigger = Trigger(delivered=failure)
        work = [UserWork("u", [trigger], None, [EVENT])]  # type: ignore[list-item]
        asyncio.run(worker._retry_or_dead(work, RuntimeError("bug")))
        assert trigger.acked == (failure == 3) and bool(trigger.naks) == (failure < 3)
    assert len(dead) == 1 and "gave up after 3 failed applies" in dead[0]
    assert "u" not in worker.events.counts  # type: ignore[attr-defined]


def test_lease_busy_redeliveries_are_no_failures() -> None:
    """Two workers on one hot user: the trigger came back 50 times because the other held
    the lease, then one apply failed. One failure is a retry, not a dead letter (JetStream's
    ``num_delivered`` counted the busy redeliveries too and gave up at once)."""
    dead: list[str] = []
    worker = _worker(3, dead)
    trigger = Trigger(delivered=50)
    work = [UserWork("u", [trigger], None, [EVENT])]  # type: ignore[list-item]
    asyncio.run(worker._retry_or_dead(work, RuntimeError("one real failure")))
    assert not dead and not trigger.acked
    assert trigger.naks == [BACKOFF_S[0]]  # the first failure's backoff, not the 50th's
    # Its events applied (or dead-lettered) since: the next backlog starts at a later
    # sequence, and its failures count from 1 again.
    later = (7, pb.Event(user_id="u", item_id="j", event_type=pb.EVENT_TYPE_CLICK))
    for _ in range(2):
        trigger = Trigger(delivered=60)
        work = [UserWork("u", [trigger], None, [later])]  # type: ignore[list-item]
        asyncio.run(worker._retry_or_dead(work, RuntimeError("again")))
    assert not dead and not trigger.acked


def test_a_blocking_log_closes_once_and_fast(tmp_path: Path) -> None:
    """Closing twice (a gateway stopped by a test and again by its fixture) neither waits on
    the stopped loop nor leaves a close coroutine behind, never awaited; calls after the
    close fail as the log being unavailable."""
    from ops.processes import free_port
    from services.events.log import BlockingEventLog, EventLogUnavailable

    settings = Settings(nats_urls=f"nats://127.0.0.1:{free_port()}", var_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        events = BlockingEventLog(settings, "test-close")  # nothing listens: still connecting
        events.close()
        started = time.monotonic()
        events.close()
        assert time.monotonic() - started < 0.5
        with pytest.raises(EventLogUnavailable, match="closed"):
            events.call(lambda log: log.healthy(), 1.0)
        del events
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]
