"""Per-client rate limiting: a token bucket per caller, ``RESOURCE_EXHAUSTED`` when empty.

The caller is the :class:`~services.reliability.auth.Principal` the auth interceptor admitted
(its API-key client name, else its certificate name or address), so this interceptor goes
after :class:`~services.reliability.auth.AuthInterceptor`. Each call costs one token; a
bucket holds ``RECSYS_RATE_LIMIT_BURST`` tokens and refills at ``RECSYS_RATE_LIMIT_RPS``
(an API key's own ``rate_limit_rps`` overrides the rate). A rejected call gets the trailer
``retry-after-ms`` and a ``google.rpc.RetryInfo`` detail: when one token will be back.
Buckets of idle clients are dropped beyond :data:`MAX_CLIENTS`, so memory stays bounded.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import grpc

from core.config import Settings
from services.reliability.auth import current_principal, peer_name
from services.reliability.guard import GuardInterceptor, abort
from services.reliability.retry_info import jittered, retry_trailers

MAX_CLIENTS = 10_000


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


class RateLimitInterceptor(GuardInterceptor):
    """Rejects a client's calls beyond its rate with ``RESOURCE_EXHAUSTED`` and a retry hint."""

    def __init__(self, rate: float, burst: int = 0) -> None:
        self.buckets = TokenBuckets(rate, burst)

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimitInterceptor:
        return cls(settings.rate_limit_rps, settings.rate_limit_burst)

    def guard(
        self, method: str, context: grpc.ServicerContext
    ) -> contextlib.AbstractContextManager[None]:
        principal = current_principal()
        client = principal.client if principal else peer_name(context)
        rate = principal.rate_limit_rps if principal else None
        wait = self.buckets.take(client, rate)
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
