"""``google.rpc.Status`` with a ``google.rpc.RetryInfo`` detail, without googleapis protos.

gRPC clients of every language read a rich error status from the ``grpc-status-details-bin``
trailer; a ``RetryInfo`` detail there tells them how long to back off. Both messages come from
the one private ``google.rpc`` pool of :mod:`services.reliability.rpc_status`. A plain
``retry-after-ms`` trailer says the same for clients that do not decode details, and
``grpc-retry-pushback-ms`` says it to gRPC's own retry logic (the service-config retries of
``recsys_client`` and of other languages' clients wait exactly that long before the next
attempt). Hints carry jitter (:func:`jittered`), so the clients shed together do not all
come back in the same millisecond.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

from services.reliability.rpc_status import DETAILS_KEY, RetryInfo, Status

__all__ = ["DETAILS_KEY", "PUSHBACK_KEY", "RETRY_AFTER_KEY", "RetryInfo", "Status"]

RETRY_AFTER_KEY = "retry-after-ms"
PUSHBACK_KEY = "grpc-retry-pushback-ms"
JITTER = 0.2  # hints are stretched by up to 20 %, never shortened


def retry_trailers(code: int, message: str, delay_s: float) -> tuple[tuple[str, Any], ...]:
    """Trailing metadata for a retryable rejection: ``retry-after-ms`` and the rich status."""
    millis = max(1, math.ceil(delay_s * 1000))
    info = RetryInfo()
    info.retry_delay.FromMilliseconds(millis)
    status = Status(code=code, message=message)
    status.details.add().Pack(info)
    return (
        (RETRY_AFTER_KEY, str(millis)),
        (PUSHBACK_KEY, str(millis)),
        (DETAILS_KEY, status.SerializeToString()),
    )


def jittered(delay_s: float, rand: Callable[[], float] = random.random) -> float:
    """``delay_s`` stretched by a random 0-20 %: never earlier than the token is back."""
    return delay_s * (1.0 + JITTER * rand())


def retry_delay_ms(trailing_metadata: Any) -> int | None:
    """The server's suggested back-off from a call's trailers (client side), if any."""
    for key, value in trailing_metadata or ():
        if key == RETRY_AFTER_KEY:
            return int(value)
    return None
