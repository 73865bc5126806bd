"""Request validation: every rule a client can break, with the message it gets back.

Each check raises :class:`InvalidArgument`, which the servicer turns into
``INVALID_ARGUMENT``; messages name the field and the rule so a caller can fix the request
without reading our code.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence

from core.config import Settings
from services.api import pb

ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
MAX_CATEGORY_LENGTH = 64
MAX_CATEGORIES = 32
MAX_EXCLUDE = 1000
MAX_TITLE_LENGTH = 512
MAX_DESCRIPTION_LENGTH = 10_000
FUTURE_SLACK_S = 24 * 3600  # client clocks drift; a day ahead is a bug, not drift


class InvalidArgument(ValueError):
    """The request breaks a documented rule; the message says which."""


def check_id(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(f"{field} is required")
    if not ID_PATTERN.match(value):
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise InvalidArgument(
            f"{field} {shown!r} is malformed: use 1-128 characters from [A-Za-z0-9_.:-]"
        )
    return value


def check_k(k: int, settings: Settings) -> int:
    """0 means the server default; anything else must be within 1..max_k."""
    if k == 0:
        return settings.default_k
    if k < 0 or k > settings.max_k:
        raise InvalidArgument(f"k must be between 1 and {settings.max_k} (0 = default), got {k}")
    return k


def check_categories(categories: Sequence[str], field: str = "categories") -> list[str]:
    if len(categories) > MAX_CATEGORIES:
        raise InvalidArgument(f"{field}: at most {MAX_CATEGORIES} entries, got {len(categories)}")
    out = []
    for c in categories:
        if not c.strip() or len(c) > MAX_CATEGORY_LENGTH:
            raise InvalidArgument(f"{field}: each entry needs 1-{MAX_CATEGORY_LENGTH} characters")
        if not c.isprintable():
            raise InvalidArgument(f"{field}: entries must not contain control characters")
        out.append(c.strip())
    return out


def check_excludes(ids: Sequence[str]) -> list[str]:
    if len(ids) > MAX_EXCLUDE:
        raise InvalidArgument(f"exclude_item_ids: at most {MAX_EXCLUDE} entries, got {len(ids)}")
    return [check_id(i, "exclude_item_ids entry") for i in ids]


def check_diversity(request: pb.RecommendRequest) -> float | None:
    if not request.HasField("diversity"):
        return None
    value = request.diversity
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise InvalidArgument(f"diversity must be within [0, 1], got {value}")
    return float(value)


def check_event(event: pb.Event, index: int, now_s: float | None = None) -> None:
    where = f"events[{index}]"
    check_id(event.user_id, f"{where}.user_id")
    check_id(event.item_id, f"{where}.item_id")
    if event.event_type == pb.EVENT_TYPE_UNSPECIFIED:
        raise InvalidArgument(f"{where}.event_type must be set (VIEW, CLICK, RATING or PURCHASE)")
    if event.event_type not in pb.EventType.values():
        raise InvalidArgument(f"{where}.event_type {event.event_type} is not a known EventType")
    if event.event_type == pb.EVENT_TYPE_RATING and not (
        math.isfinite(event.value) and 0.5 <= event.value <= 5.0
    ):
        raise InvalidArgument(f"{where}.value must be a rating within [0.5, 5], got {event.value}")
    if event.HasField("event_time"):
        now = time.time() if now_s is None else now_s
        seconds, nanos = event.event_time.seconds, event.event_time.nanos
        if not 0 <= nanos < 1_000_000_000:
            raise InvalidArgument(f"{where}.event_time.nanos must be within [0, 999999999]")
        if seconds < 0 or seconds > now + FUTURE_SLACK_S:
            raise InvalidArgument(f"{where}.event_time is outside [1970, now + 1 day]")
    if len(event.idempotency_key) > 128:
        raise InvalidArgument(f"{where}.idempotency_key: at most 128 characters")


def check_events(events: Sequence[pb.Event], max_events: int) -> None:
    if not events:
        raise InvalidArgument("events must not be empty")
    if len(events) > max_events:
        raise InvalidArgument(f"events: at most {max_events} per call, got {len(events)}")
    now = time.time()
    for i, event in enumerate(events):
        check_event(event, i, now)


def check_item(item: pb.Item, index: int) -> None:
    where = f"items[{index}]"
    check_id(item.item_id, f"{where}.item_id")
    if not item.title.strip():
        raise InvalidArgument(f"{where}.title is required")
    if len(item.title) > MAX_TITLE_LENGTH:
        raise InvalidArgument(f"{where}.title: at most {MAX_TITLE_LENGTH} characters")
    if len(item.description) > MAX_DESCRIPTION_LENGTH:
        raise InvalidArgument(f"{where}.description: at most {MAX_DESCRIPTION_LENGTH} characters")
    check_categories(item.categories, f"{where}.categories")
    if item.HasField("create_time") and not (
        0 <= item.create_time.seconds <= time.time() + FUTURE_SLACK_S
        and 0 <= item.create_time.nanos < 1_000_000_000
    ):
        raise InvalidArgument(f"{where}.create_time is outside [1970, now + 1 day]")
