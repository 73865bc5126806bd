"""Request validation: every rule a client can break, with the message it gets back.

Each check raises :class:`InvalidArgument`, which the servicer turns into
``INVALID_ARGUMENT``; messages name the field and the rule so a caller can fix the request
without reading our code. String limits are the Milvus schema's (:mod:`core.milvus_schema`)
and, like a Milvus server's VARCHAR ``max_length``, count UTF-8 bytes, not characters: a limit
counted in characters lets multibyte text through to a write Milvus refuses (UNAVAILABLE,
which clients retry) instead of failing here (INVALID_ARGUMENT). Milvus Lite counts
characters; bytes are the stricter rule and hold for both.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence

from core.config import Settings
from core.milvus_schema import (
    CATEGORY_MAX_LENGTH,
    ID_MAX_LENGTH,
    MAX_CATEGORIES,
    TITLE_MAX_LENGTH,
)
from services.api import pb

# ASCII only, so characters = bytes. Matched with fullmatch: "$" would accept a trailing "\n".
ID_PATTERN = re.compile(rf"[A-Za-z0-9_.:\-]{{1,{ID_MAX_LENGTH}}}")
MAX_EXCLUDE = 1000
# The description is embedded in full but stored cut to TEXT_MAX_LENGTH bytes (core.rows),
# so its request limit is a size guard, not a schema limit.
MAX_DESCRIPTION_BYTES = 10_000
MAX_IDEMPOTENCY_KEY_BYTES = 128
FUTURE_SLACK_S = 24 * 3600  # client clocks drift; a day ahead is a bug, not drift


class InvalidArgument(ValueError):
    """The request breaks a documented rule; the message says which."""


def utf8_len(value: str) -> int:
    """Length as Milvus counts it: UTF-8 bytes (lone surrogates count as one byte each)."""
    return len(value.encode("utf-8", "replace"))


def check_bytes(value: str, limit: int, field: str) -> str:
    """``value`` fits ``limit`` UTF-8 bytes, else an error naming the field and the limit."""
    size = utf8_len(value)
    if size > limit:
        raise InvalidArgument(
            f"{field}: at most {limit} bytes (UTF-8), got {size} ({len(value)} characters)"
        )
    return value


def check_id(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(f"{field} is required")
    if not ID_PATTERN.fullmatch(value):
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise InvalidArgument(
            f"{field} {shown!r} is malformed: use 1-{ID_MAX_LENGTH} bytes from "
            "[A-Za-z0-9_.:-] (ASCII letters, digits and _.:-; no spaces or control characters)"
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
        if not c.strip() or utf8_len(c) > CATEGORY_MAX_LENGTH:
            raise InvalidArgument(
                f"{field}: each entry needs 1-{CATEGORY_MAX_LENGTH} bytes (UTF-8), "
                f"got {utf8_len(c)} in {c[:40]!r}"
            )
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
    check_bytes(event.idempotency_key, MAX_IDEMPOTENCY_KEY_BYTES, f"{where}.idempotency_key")


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
    check_bytes(item.title, TITLE_MAX_LENGTH, f"{where}.title")
    check_bytes(item.description, MAX_DESCRIPTION_BYTES, f"{where}.description")
    check_categories(item.categories, f"{where}.categories")
    if item.HasField("create_time") and not (
        0 <= item.create_time.seconds <= time.time() + FUTURE_SLACK_S
        and 0 <= item.create_time.nanos < 1_000_000_000
    ):
        raise InvalidArgument(f"{where}.create_time is outside [1970, now + 1 day]")
