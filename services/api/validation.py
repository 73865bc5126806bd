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
MAX_RULE_IDS = 100  # boosted, buried or pinned ids per request, each
# The description is embedded in full but stored cut to TEXT_MAX_LENGTH bytes (core.rows),
# so its request limit is a size guard, not a schema limit.
MAX_DESCRIPTION_BYTES = 10_000
MAX_IDEMPOTENCY_KEY_BYTES = 128
FUTURE_SLACK_S = 24 * 3600  # client clocks drift; a day ahead is a bug, not drift
# The largest valid item and event on the wire (ids, text and categories at their limits,
# plus a generous allowance for tags, lengths and timestamps), for the receive limit.
MAX_ITEM_BYTES = (
    ID_MAX_LENGTH + TITLE_MAX_LENGTH + MAX_DESCRIPTION_BYTES + MAX_CATEGORIES * CATEGORY_MAX_LENGTH
) + 256
MAX_EVENT_BYTES = 4 * ID_MAX_LENGTH + MAX_IDEMPOTENCY_KEY_BYTES + 128
MIN_RECEIVE_BYTES = 4 * 1024 * 1024  # gRPC's default
RECEIVE_HEADROOM = 2  # lists up to this many times their limit reach validation


class InvalidArgument(ValueError):
    """The request breaks a documented rule; the message says which, ``field`` names the
    field (the ``BadRequest`` field violation) and ``reason`` is the ``ErrorInfo`` code."""

    def __init__(self, message: str, field: str = "", reason: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message)
        self.field = field
        self.reason = reason


def max_receive_bytes(settings: Settings) -> int:
    """The server's receive limit: ``RECEIVE_HEADROOM`` times the largest valid request
    (``UpsertItems`` or ``IngestEvents`` at their per-call limits), at least gRPC's 4 MiB.
    A message over the limit is refused by gRPC core (``RESOURCE_EXHAUSTED``, no details)
    before any of our code runs; everything up to it is decoded and validated here, so a
    list too long by up to that factor gets ``INVALID_ARGUMENT`` with a ``BadRequest``."""
    largest = max(
        settings.max_items_per_call * MAX_ITEM_BYTES,
        settings.max_events_per_call * MAX_EVENT_BYTES,
    )
    return max(MIN_RECEIVE_BYTES, RECEIVE_HEADROOM * largest)


def utf8_len(value: str) -> int:
    """Length as Milvus counts it: UTF-8 bytes (lone surrogates count as one byte each)."""
    return len(value.encode("utf-8", "replace"))


def check_bytes(value: str, limit: int, field: str) -> str:
    """``value`` fits ``limit`` UTF-8 bytes, else an error naming the field and the limit."""
    size = utf8_len(value)
    if size > limit:
        raise InvalidArgument(
            f"{field}: at most {limit} bytes (UTF-8), got {size} ({len(value)} characters)",
            field,
            "FIELD_TOO_LONG",
        )
    return value


def check_id(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(f"{field} is required", field, "FIELD_REQUIRED")
    if not ID_PATTERN.fullmatch(value):
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise InvalidArgument(
            f"{field} {shown!r} is malformed: use 1-{ID_MAX_LENGTH} bytes from "
            "[A-Za-z0-9_.:-] (ASCII letters, digits and _.:-; no spaces or control characters)",
            field,
            "MALFORMED_ID",
        )
    return value


def check_k(k: int, settings: Settings) -> int:
    """0 means the server default; anything else must be within 1..max_k."""
    if k == 0:
        return settings.default_k
    if k < 0 or k > settings.max_k:
        raise InvalidArgument(
            f"k must be between 1 and {settings.max_k} (0 = default), got {k}", "k", "OUT_OF_RANGE"
        )
    return k


def check_categories(categories: Sequence[str], field: str = "categories") -> list[str]:
    if len(categories) > MAX_CATEGORIES:
        raise InvalidArgument(
            f"{field}: at most {MAX_CATEGORIES} entries, got {len(categories)}",
            field,
            "TOO_MANY_ENTRIES",
        )
    out = []
    for c in categories:
        if not c.strip() or utf8_len(c) > CATEGORY_MAX_LENGTH:
            raise InvalidArgument(
                f"{field}: each entry needs 1-{CATEGORY_MAX_LENGTH} bytes (UTF-8), "
                f"got {utf8_len(c)} in {c[:40]!r}",
                field,
                "MALFORMED_CATEGORY",
            )
        if not c.isprintable():
            raise InvalidArgument(
                f"{field}: entries must not contain control characters", field, "MALFORMED_CATEGORY"
            )
        out.append(c.strip())
    return out


def check_excludes(ids: Sequence[str]) -> list[str]:
    return check_ids(ids, "exclude_item_ids", MAX_EXCLUDE)


def check_ids(ids: Sequence[str], field: str, limit: int, required: bool = False) -> list[str]:
    """At most ``limit`` well-formed ids (at least one when ``required``), each checked."""
    if required and not ids:
        raise InvalidArgument(f"{field} must not be empty", field, "FIELD_REQUIRED")
    if len(ids) > limit:
        raise InvalidArgument(
            f"{field}: at most {limit} entries, got {len(ids)}", field, "TOO_MANY_ENTRIES"
        )
    return [check_id(value, f"{field}[{i}]") for i, value in enumerate(ids)]


def check_diversity(request: pb.RecommendRequest) -> float | None:
    if not request.HasField("diversity"):
        return None
    value = request.diversity
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise InvalidArgument(
            f"diversity must be within [0, 1], got {value}", "diversity", "OUT_OF_RANGE"
        )
    return float(value)


def check_visitor(user_id: str, session_id: str, user_field: str, session_field: str) -> None:
    """Exactly one of a user id and an anonymous session id, well formed."""
    if user_id and session_id:
        raise InvalidArgument(
            f"set {user_field} or {session_field} (an anonymous session), not both",
            session_field,
            "CONFLICTING_FIELDS",
        )
    if session_id:
        check_id(session_id, session_field)
    else:
        check_id(user_id, user_field)


def check_context(context: pb.RequestContext) -> tuple[str, str, str, str]:
    """``(surface, device, current_item_id, session_id)``, each empty or a well-formed id."""
    values = (context.surface, context.device, context.current_item_id, context.session_id)
    names = ("surface", "device", "current_item_id", "session_id")
    for value, name in zip(values, names, strict=True):
        if value:
            check_id(value, f"context.{name}")
    return values


def check_unused(*fields: tuple[str, str], method: str) -> None:
    """Each ``(value, field)`` is empty: a field ``method`` does not use is refused, not
    silently ignored (so a later use of it changes no existing caller's answers)."""
    for value, field in fields:
        if value:
            raise InvalidArgument(
                f"{field} is not used by {method}: leave it empty", field, "FIELD_NOT_SUPPORTED"
            )


def check_repeat_policy(policy: pb.RepeatPolicy) -> tuple[bool, frozenset[str]]:
    """``(allow_seen, allow_seen_categories)``."""
    field = "repeat_policy.allow_seen_categories"
    return policy.allow_seen, frozenset(check_categories(policy.allow_seen_categories, field))


def check_item_filter(item_filter: pb.ItemFilter) -> tuple[frozenset[str], int]:
    """``(exclude_categories, min_created_at)``, the time in epoch seconds (0 = none)."""
    field = "item_filter.exclude_categories"
    exclude = frozenset(check_categories(item_filter.exclude_categories, field))
    if not item_filter.HasField("min_create_time"):
        return exclude, 0
    stamp = item_filter.min_create_time
    if stamp.seconds < 0 or not 0 <= stamp.nanos < 1_000_000_000:
        raise InvalidArgument(
            "item_filter.min_create_time must be a time after 1970",
            "item_filter.min_create_time",
            "OUT_OF_RANGE",
        )
    return exclude, int(stamp.seconds) + (1 if stamp.nanos else 0)


def check_business_rules(
    rules: pb.BusinessRules,
) -> tuple[frozenset[str], frozenset[str], tuple[str, ...]]:
    """``(boost, bury, pin)`` ids, at most :data:`MAX_RULE_IDS` each; an id may not be both
    boosted and buried."""
    where = "business_rules"
    boost = check_ids(rules.boost_item_ids, f"{where}.boost_item_ids", MAX_RULE_IDS)
    bury = check_ids(rules.bury_item_ids, f"{where}.bury_item_ids", MAX_RULE_IDS)
    pin = check_ids(rules.pin_item_ids, f"{where}.pin_item_ids", MAX_RULE_IDS)
    both = sorted(set(boost) & set(bury))
    if both:
        raise InvalidArgument(
            f"{where}: {both[0]!r} is both boosted and buried",
            f"{where}.bury_item_ids",
            "CONFLICTING_FIELDS",
        )
    return frozenset(boost), frozenset(bury), tuple(dict.fromkeys(pin))


def stored_event(payload: bytes, user_id: str) -> pb.Event:
    """An event as the log stores it on ``user_id``'s subject, checked as ``IngestEvents``
    checks one. Raises ``DecodeError`` or :class:`InvalidArgument`: it can never apply (the
    profile worker dead-letters it; a profile read leaves it out)."""
    event = pb.Event.FromString(payload)
    check_event(event, 0)
    if event.user_id != user_id:
        raise InvalidArgument("user_id does not match its subject")
    return event


def check_event(event: pb.Event, index: int, now_s: float | None = None) -> None:
    where = f"events[{index}]"
    check_visitor(event.user_id, event.session_id, f"{where}.user_id", f"{where}.session_id")
    check_id(event.item_id, f"{where}.item_id")
    kind = f"{where}.event_type"
    if event.event_type == pb.EVENT_TYPE_UNSPECIFIED:
        raise InvalidArgument(
            f"{kind} must be set (VIEW, CLICK, RATING or PURCHASE)", kind, "FIELD_REQUIRED"
        )
    if event.event_type not in pb.EventType.values():
        raise InvalidArgument(
            f"{kind} {event.event_type} is not a known EventType", kind, "UNKNOWN_ENUM_VALUE"
        )
    if event.event_type == pb.EVENT_TYPE_RATING and not (
        math.isfinite(event.value) and 0.5 <= event.value <= 5.0
    ):
        raise InvalidArgument(
            f"{where}.value must be a rating within [0.5, 5], got {event.value}",
            f"{where}.value",
            "OUT_OF_RANGE",
        )
    if event.HasField("event_time"):
        now = time.time() if now_s is None else now_s
        seconds, nanos = event.event_time.seconds, event.event_time.nanos
        if not 0 <= nanos < 1_000_000_000:
            raise InvalidArgument(
                f"{where}.event_time.nanos must be within [0, 999999999]",
                f"{where}.event_time.nanos",
                "OUT_OF_RANGE",
            )
        if seconds < 0 or seconds > now + FUTURE_SLACK_S:
            raise InvalidArgument(
                f"{where}.event_time is outside [1970, now + 1 day]",
                f"{where}.event_time",
                "OUT_OF_RANGE",
            )
    check_bytes(event.idempotency_key, MAX_IDEMPOTENCY_KEY_BYTES, f"{where}.idempotency_key")
    if event.recommendation_id:
        check_id(event.recommendation_id, f"{where}.recommendation_id")


def check_events(events: Sequence[pb.Event], max_events: int) -> None:
    if not events:
        raise InvalidArgument("events must not be empty", "events", "FIELD_REQUIRED")
    if len(events) > max_events:
        raise InvalidArgument(
            f"events: at most {max_events} per call, got {len(events)}",
            "events",
            "TOO_MANY_ENTRIES",
        )
    now = time.time()
    for i, event in enumerate(events):
        check_event(event, i, now)


def check_item(item: pb.Item, index: int) -> None:
    where = f"items[{index}]"
    check_id(item.item_id, f"{where}.item_id")
    if not item.title.strip():
        raise InvalidArgument(f"{where}.title is required", f"{where}.title", "FIELD_REQUIRED")
    check_bytes(item.title, TITLE_MAX_LENGTH, f"{where}.title")
    check_bytes(item.description, MAX_DESCRIPTION_BYTES, f"{where}.description")
    check_categories(item.categories, f"{where}.categories")
    if item.HasField("create_time") and not (
        0 <= item.create_time.seconds <= time.time() + FUTURE_SLACK_S
        and 0 <= item.create_time.nanos < 1_000_000_000
    ):
        raise InvalidArgument(
            f"{where}.create_time is outside [1970, now + 1 day]",
            f"{where}.create_time",
            "OUT_OF_RANGE",
        )
