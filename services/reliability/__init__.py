"""Security and reliability of the gateway: identity, limits, durable ingestion, privacy.

:func:`interceptors` gives the server interceptors in their order (authentication first,
so the rate limiter and the servicer know the caller; then the check that a user-bound key
names its own user; then the per-client rate limit; then the concurrency limit).
:func:`server_credentials` gives TLS/mTLS credentials (reloaded on change) or None.
"""

from __future__ import annotations

import grpc

from core.config import Settings
from services.events.log import BlockingEventLog
from services.reliability import pseudonym
from services.reliability.auth import AuthInterceptor, current_principal
from services.reliability.concurrency import ConcurrencyLimiter, max_concurrent_rpcs
from services.reliability.ratelimit import RateLimitInterceptor
from services.reliability.tls import server_credentials
from services.reliability.user_binding import UserBindingInterceptor

__all__ = [
    "current_principal",
    "interceptors",
    "max_concurrent_rpcs",
    "pseudonym",
    "server_credentials",
]


def interceptors(
    settings: Settings, events: BlockingEventLog | None = None
) -> list[grpc.ServerInterceptor]:
    """Auth, per-user binding, rate limit (its buckets shared through ``events``, when
    given) and concurrency limit, outermost first."""
    return [
        AuthInterceptor.from_settings(settings),
        UserBindingInterceptor(),
        RateLimitInterceptor.from_settings(settings, events),
        ConcurrencyLimiter.from_settings(settings),
    ]
