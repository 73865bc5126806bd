"""Per-client rate limiting: a token bucket per caller, ``RESOURCE_EXHAUSTED`` when empty.

The caller is the :class:`~services.reliability.auth.Principal` the auth interceptor admitted
(its API-key client name, else its certificate name or address), so this interceptor goes
after :class:`~services.reliability.auth.AuthInterceptor`. Each call costs one token; a
bucket holds ``RECSYS_RATE_LIMIT_BURST`` tokens and refills at ``RECSYS_RATE_LIMIT_RPS``
(an API key's own ``rate_limit_rps`` overrides the rate). A rejected call gets the trailer
``retry-after-ms`` and a ``google.rpc.RetryInfo`` detail: when one token will be back.
Buckets of idle clients are dropped beyond :data:`MAX_CLIENTS`, so memory stays bounded.

A limit is meant for the client, not for one gateway process: with ``rate_limit_shared`` (the
default) each client's bucket lives once, in the event log's key-value store
(:class:`SharedBuckets`), and every process of every replica draws on it, so N replicas
admit the client's rate once, not N times. A process takes :data:`LEASE_S` of the rate at
once (at least one call; one compare-and-set on NATS per lease, none for the calls it
covers): over time the client gets its rate, and a burst may exceed the bucket by what the
processes still hold of their last leases. While NATS does not answer (within
:data:`SHARED_TIMEOUT_S`), each process limits on its own bucket, as before: calls are
neither refused nor stalled by the log's outage.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import grpc
import nats.js.errors
from nats.js.kv import KeyValue

from core.config import Settings
from services.events.log import BlockingEventLog, EventLog, EventLogUnavailable
from services.reliability.auth import current_principal, peer_name
from services.reliability.guard import GuardInterceptor, abort
from services.reliability.retry_info import jittered, retry_trailers

log = logging.getLogger(__name__)
MAX_CLIENTS = 10_000
LEASE_S = 0.1  # a process takes this much of a client's rate from the shared bucket at once
SHARED_TIMEOUT_S = 0.05  # then the call is limited by this process's own bucket
SHARED_ATTEMPTS = 4  # compare-and-set tries; all lost: the client's calls crowd its bucket
SHARED_TTL_S = 3600.0  # a key idle this long is dropped: a full bucket, as refilling gives
WARN_EVERY_S = 60.0


class TokenBuckets:
    """Thread-safe token buckets keyed by client; :meth:`take` says how long to wait."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def capacity(self, rate: float) -> float:
        return float(self.burst) if self.burst else max(1.0, rate)

    def take(self, client: str, rate: float | None = None) -> float:
        """Spend a token of ``client``: 0.0 if granted, else seconds until one is back."""
        rate = self.rate if rate is None else rate
        if rate <= 0:
            return 0.0
        capacity = self.capacity(rate)
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.pop(client, (capacity, now))
            tokens = min(capacity, tokens + (now - last) * rate)
            wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / rate
            self._buckets[client] = (tokens - 1.0 if wait == 0.0 else tokens, now)
            while len(self._buckets) > MAX_CLIENTS:
                self._buckets.popitem(last=False)
        return wait


def client_key(client: str) -> str:
    """The client's key in the shared bucket: a hash, as key names allow few characters."""
    return hashlib.sha256(client.encode("utf-8", "surrogatepass")).hexdigest()[:40]


class SharedBuckets:
    """Token buckets of :class:`TokenBuckets`' shape kept in a NATS key-value bucket, one key
    per client (``"<tokens> <wall-clock seconds>"``), spent by compare-and-set, so that every
    gateway process draws on one bucket per client. ``local`` limits while NATS does not
    answer. Wall-clock time, as processes on several machines share the value: a clock behind
    the stored one refills nothing until it catches up."""

    def __init__(
        self,
        events: BlockingEventLog,
        bucket: str,
        local: TokenBuckets,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.events, self.bucket, self.local, self.clock = events, bucket, local, clock
        self._held: OrderedDict[str, int] = OrderedDict()  # leased tokens not spent yet
        self._held_lock = threading.Lock()
        # last value and revision written or read per key; only the log's thread uses it.
        # Other processes only spend, so a cached value never holds fewer tokens than NATS.
        self._seen: OrderedDict[str, tuple[float, float, int]] = OrderedDict()
        self._warned = -math.inf

    def take(self, client: str, rate: float | None = None) -> float:
        """Spend a token of ``client``: 0.0 if granted, else seconds until one is back."""
        rate = self.local.rate if rate is None else rate
        if rate <= 0:
            return 0.0
        with self._held_lock:
            if self._held.get(client, 0) > 0:
                self._held[client] -= 1
                return 0.0
        capacity = self.local.capacity(rate)
        try:
            got, wait = self.events.call(
                lambda el: self._lease(el, client_key(client), rate, capacity), SHARED_TIMEOUT_S
            )
        except EventLogUnavailable as exc:
            if time.monotonic() - self._warned > WARN_EVERY_S:
                self._warned = time.monotonic()
                log.warning("rate limits are per process while the event log fails: %s", exc)
            return self.local.take(client, rate)
        if got:
            with self._held_lock:
                self._held[client] = self._held.pop(client, 0) + got - 1
                while len(self._held) > MAX_CLIENTS:
                    self._held.popitem(last=False)
        return wait

    async def _lease(
        self, events: EventLog, key: str, rate: float, capacity: float
    ) -> tuple[int, float]:
        """Take up to :data:`LEASE_S` of ``rate`` in tokens (at least one) from the shared
        bucket: ``(tokens taken, 0.0)``, or ``(0, seconds until one is back)``. A call whose
        every write lost to other processes' is refused for one token's time: only a client
        calling that fast through several processes at once meets it, and admitting it
        would exceed the limit."""
        kv = await events.bucket(self.bucket, ttl=SHARED_TTL_S, create=True)
        want = max(1, int(rate * LEASE_S))
        for _ in range(SHARED_ATTEMPTS):
            seen = self._seen.pop(key, None) or await _read_bucket(kv, key)
            now = self.clock()
            tokens, at, revision = seen or (capacity, now, 0)
            tokens = min(capacity, tokens + max(0.0, now - at) * rate)
            at = max(at, now)
            if tokens < 1.0:
                self._remember(key, (tokens, at, revision))
                return 0, (1.0 - tokens) / rate
            got = min(want, int(tokens))
            value = f"{tokens - got!r} {at!r}".encode()
            try:
                if revision:
                    revision = await kv.update(key, value, last=revision)
                else:
                    revision = await kv.create(key, value)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # another process spent first: read its value
            self._remember(key, (tokens - got, at, revision))
            return got, 0.0
        return 0, 1.0 / rate

    def _remember(self, key: str, seen: tuple[float, float, int]) -> None:
        self._seen[key] = seen
        while len(self._seen) > MAX_CLIENTS:
            self._seen.popitem(last=False)


async def _read_bucket(kv: KeyValue, key: str) -> tuple[float, float, int] | None:
    """``(tokens, at, revision)`` of a client's shared bucket; None when it has none (a
    value that does not parse is overwritten as a full bucket)."""
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return None
    revision = int(entry.revision or 0)
    try:
        tokens, at = (float(x) for x in (entry.value or b"").decode().split())
    except ValueError:
        return (math.inf, 0.0, revision)
    return (tokens, at, revision)


class RateLimitInterceptor(GuardInterceptor):
    """Rejects a client's calls beyond its rate with ``RESOURCE_EXHAUSTED`` and a retry hint."""

    def __init__(
        self, rate: float, burst: int = 0, shared: tuple[BlockingEventLog, str] | None = None
    ) -> None:
        self.buckets = TokenBuckets(rate, burst)
        self.shared = None if shared is None else SharedBuckets(*shared, self.buckets)

    @classmethod
    def from_settings(
        cls, settings: Settings, events: BlockingEventLog | None = None
    ) -> RateLimitInterceptor:
        """Shared through ``events`` when the settings say so and a log is given."""
        shared = None
        if settings.rate_limit_shared and events is not None:
            shared = (events, settings.rate_limit_bucket)
        return cls(settings.rate_limit_rps, settings.rate_limit_burst, shared)

    def guard(
        self, method: str, context: grpc.ServicerContext
    ) -> contextlib.AbstractContextManager[None]:
        principal = current_principal()
        client = principal.client if principal else peer_name(context)
        rate = principal.rate_limit_rps if principal else None
        wait = (self.shared or self.buckets).take(client, rate)
        if wait > 0:
            wait = jittered(wait)
            limit = self.buckets.rate if rate is None else rate
            message = (
                f"rate limit of {limit:g} calls/s for client {client!r} exceeded; "
                f"retry after {math.ceil(wait * 1000)} ms"
            )
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
            trailers = retry_trailers(code.value[0], message, wait)
            abort(context, code, message, trailers, reason="RATE_LIMITED")
        return contextlib.nullcontext()
