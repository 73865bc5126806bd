"""Bounded concurrency: a few calls work at once, others queue briefly, then are shed.

Three layers keep an overloaded gateway answering instead of growing without bound:

1. :class:`ConcurrencyLimiter` - at most ``RECSYS_MAX_IN_FLIGHT`` calls run servicer code at
   once. A call beyond that waits for a slot for at most ``min(RECSYS_MAX_QUEUE_WAIT_S, time
   left before its deadline)`` (``RECSYS_DEFAULT_DEADLINE_S`` when the client sent none), then
   is shed with ``RESOURCE_EXHAUSTED`` and a ``retry-after-ms`` hint. A call whose deadline
   has already passed while it waited for a thread is answered ``DEADLINE_EXCEEDED`` at once.
2. The thread pool (``RECSYS_GRPC_WORKERS``) holds the running calls and the queued ones;
   :func:`effective_in_flight` keeps at least one thread for queued and health calls.
3. gRPC's own ``maximum_concurrent_rpcs`` (:func:`max_concurrent_rpcs` = workers +
   ``RECSYS_MAX_PENDING_RPCS``) refuses calls beyond that at once, also with
   ``RESOURCE_EXHAUSTED``, so the executor's backlog is bounded too.

A call waiting for its client - a client stream between two messages - gives its slot back
meanwhile (:func:`slot_released`), so idle streams cannot hold every slot and shed the rest.

``RESOURCE_EXHAUSTED`` (not ``UNAVAILABLE``) is used for shedding, as gRPC itself does for its
concurrency limit: the request was fine, the server is busy, retry after the hint (with
backoff). Health and reflection calls are never queued here.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from core.config import Settings
from services.reliability.guard import GuardInterceptor, abort
from services.reliability.retry_info import jittered, retry_trailers

log = logging.getLogger(__name__)


class SlotUnavailable(RuntimeError):
    """No work slot came free, within the queue wait, for a call that had given its slot
    back while waiting for its client: shed it (``RESOURCE_EXHAUSTED``)."""


@dataclass
class _Slot:
    limiter: ConcurrencyLimiter
    held: bool = True


_SLOT: contextvars.ContextVar[_Slot | None] = contextvars.ContextVar("recsys_slot", default=None)


@contextlib.contextmanager
def slot_released() -> Iterator[None]:
    """Give the current call's work slot back for the block (a wait for the client), then
    take one again, waiting at most ``max_queue_wait_s`` (else :class:`SlotUnavailable`).
    A call that holds no slot (no limiter, health) just runs the block."""
    slot = _SLOT.get()
    if slot is None or not slot.held:
        yield
        return
    limiter = slot.limiter
    slot.held = False
    with limiter._lock:
        limiter.in_flight -= 1
    limiter._slots.release()
    try:
        yield
    finally:
        if not limiter._slots.acquire(timeout=limiter.max_wait_s):
            with limiter._lock:
                limiter.shed += 1
            raise SlotUnavailable(
                f"server busy: {limiter.limit} calls in flight and none finished within "
                f"{limiter.max_wait_s * 1000:.0f} ms; retry with backoff"
            )
        slot.held = True
        with limiter._lock:
            limiter.in_flight += 1


def effective_in_flight(settings: Settings) -> int:
    """``max_in_flight``, capped so one worker thread is always left for waiting calls."""
    return max(1, min(settings.max_in_flight, settings.grpc_workers - 1))


def max_concurrent_rpcs(settings: Settings) -> int:
    """The gRPC server's hard cap: every worker busy plus a bounded backlog."""
    return settings.grpc_workers + settings.max_pending_rpcs


class ConcurrencyLimiter(GuardInterceptor):
    """A semaphore of work slots with a deadline-bounded wait."""

    def __init__(self, limit: int, max_wait_s: float, default_deadline_s: float) -> None:
        self.limit = limit
        self.max_wait_s = max_wait_s
        self.default_deadline_s = default_deadline_s
        self._slots = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self.in_flight = 0
        self.shed = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> ConcurrencyLimiter:
        limit = effective_in_flight(settings)
        if limit != settings.max_in_flight:
            log.warning(
                "max_in_flight %d lowered to %d: it must stay below grpc_workers (%d)",
                settings.max_in_flight,
                limit,
                settings.grpc_workers,
            )
        return cls(limit, settings.max_queue_wait_s, settings.default_deadline_s)

    @contextlib.contextmanager
    def _held(self) -> Iterator[None]:
        with self._lock:
            self.in_flight += 1
        slot = _Slot(self)
        token = _SLOT.set(slot)
        try:
            yield
        finally:
            _SLOT.reset(token)
            if slot.held:  # not when a slot_released() could not take one back
                with self._lock:
                    self.in_flight -= 1
                self._slots.release()

    def guard(
        self, method: str, context: grpc.ServicerContext
    ) -> contextlib.AbstractContextManager[None]:
        remaining = context.time_remaining()
        if remaining is None:
            remaining = self.default_deadline_s
        if remaining <= 0:
            abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while queued")
        wait = min(self.max_wait_s, remaining)
        if not self._slots.acquire(timeout=wait):
            with self._lock:
                self.shed += 1
            if remaining <= self.max_wait_s:
                abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while queued")
            message = (
                f"server busy: {self.limit} calls in flight and none finished within "
                f"{wait * 1000:.0f} ms; retry with backoff"
            )
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            hint = jittered(self.max_wait_s)
            trailers = retry_trailers(code.value[0], message, hint)
            abort(context, code, message, trailers, reason="OVERLOADED")
        return self._held()
