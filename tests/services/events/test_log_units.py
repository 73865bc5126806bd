"""Pure parts of the event log and the worker: subject tokens, message ids, stamping, and
which failures are permanent (dead-lettered at once) rather than retried."""

from __future__ import annotations

from pymilvus import MilvusException
from pymilvus.exceptions import ParamError

from services.api import pb
from services.events.log import message_id, stamped, user_token
from services.profile_worker.worker import Permanent, is_permanent
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


def test_outages_are_waited_out_other_failures_dead_lettered() -> None:
    """A Triton or Milvus outage never dead-letters good events, however often they were
    delivered; another failure does after ``worker_max_deliveries``."""
    import asyncio
    from types import SimpleNamespace

    from core.config import Settings
    from services.inference.triton_client import InferenceUnavailable
    from services.profile_worker.worker import OUTAGE_BACKOFF_S, ProfileWorker, UserWork

    class Trigger:
        def __init__(self, delivered: int) -> None:
            self.metadata = SimpleNamespace(num_delivered=delivered)
            self.naks: list[float] = []
            self.acked = False

        async def nak(self, delay: float) -> None:
            self.naks.append(delay)

        async def ack(self) -> None:
            self.acked = True

    dead: list[str] = []
    worker = ProfileWorker.__new__(ProfileWorker)
    worker.settings = Settings(worker_max_deliveries=3)

    async def record(user_id: str, seq: int, payload: bytes, reason: str) -> None:
        dead.append(reason)

    worker._dead = record  # type: ignore[method-assign]
    event = (1, pb.Event(user_id="u", item_id="i", event_type=pb.EVENT_TYPE_CLICK))
    for exc in (InferenceUnavailable("triton down"), StoreUnavailable("milvus down")):
        trigger = Trigger(delivered=50)
        work = [UserWork("u", [trigger], None, [event])]  # type: ignore[list-item]
        asyncio.run(worker._retry_or_dead(work, exc))
        assert trigger.naks == [OUTAGE_BACKOFF_S] and not trigger.acked and not dead
    trigger = Trigger(delivered=3)
    work = [UserWork("u", [trigger], None, [event])]  # type: ignore[list-item]
    asyncio.run(worker._retry_or_dead(work, RuntimeError("bug")))
    assert trigger.acked and not trigger.naks and dead and "gave up after 3" in dead[0]
