"""What the event-log tests share: a click event and polling until something holds."""

from __future__ import annotations

import time
from collections.abc import Callable

from services.api import pb


def click(user: str, item: str, key: str = "") -> pb.Event:
    return pb.Event(user_id=user, item_id=item, event_type=pb.EVENT_TYPE_CLICK, idempotency_key=key)


def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    """True once ``predicate`` holds, False when ``timeout`` seconds pass first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return False
