"""Stage ``rules``: the request's filters, repeat policy and business rules, around ranking.

Retrieval filters by the request's categories and exclusions as it searches; what it cannot
express there is applied here, on the candidates, before the ranker spends time on them
(:meth:`Rules.admit`): the attribute conditions (categories to leave out, a minimum creation
time) and the repeat policy per item (an item seen before comes back only when the policy
allows its categories). After ranking, boosted candidates are lifted above all others and
buried ones put below all others, each group keeping the ranker's order
(:meth:`Rules.adjust`); after the final pick, pinned items take the first slots
(:meth:`Rules.pin`), read from the catalogue whether or not retrieval found them, but
never an item the filters or the repeat policy keep out.

Rules come from the request and from the configuration: :class:`RulesFile` holds the rules
file (``RECSYS_RULES_FILE``, JSON) per surface, re-read when it changes, and :func:`merge`
combines a surface's configured rules with the request's (:class:`SurfaceRules`).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from core.milvus_schema import CATEGORY_MAX_LENGTH, ID_MAX_LENGTH
from services.recommend.context import Candidate, Context, Filters, Rules
from services.vectors.store import Row, StoreUnavailable, VectorStore
from services.watched_file import RELOAD_CHECK_S, WatchedFile

log = logging.getLogger(__name__)
PINNED = "pinned"  # the source of a pinned item
MAX_CONFIGURED_IDS = 1000  # ids per list of one surface's rules (each is a Milvus filter term)
_ID = re.compile(rf"[A-Za-z0-9_.:\-]{{1,{ID_MAX_LENGTH}}}")
_KEYS = frozenset(
    {
        "boost_item_ids",
        "bury_item_ids",
        "pin_item_ids",
        "exclude_item_ids",
        "exclude_categories",
        "min_create_time",
        "repeat_policy",
    }
)


def allowed(ctx: Context, row: Row, seen: set[str]) -> bool:
    """The request's filters admit ``row`` and, if the user saw it, the repeat policy too."""
    if not ctx.filters.admits(row):
        return False
    return row["item_id"] not in seen or ctx.rules.may_repeat(row)


class ApplyRules:
    """Three steps of one stage: :meth:`admit` after retrieval, :meth:`adjust` after
    ranking, :meth:`pin` after diversification; the last two, when the request has rules,
    are timed under ``rules``."""

    name = "rules"

    def __init__(self, store: VectorStore) -> None:
        self.store = store

    def admit(self, ctx: Context) -> None:
        """Drop the candidates the filters or the repeat policy keep out (in memory: not
        timed apart, its time counts toward ranking's)."""
        seen = ctx.interacted_ids()
        ctx.candidates = [c for c in ctx.candidates if allowed(ctx, c.row, seen)]

    def adjust(self, ctx: Context) -> None:
        """Boosted candidates above every other one, buried ones below (order kept within)."""
        rules = ctx.rules
        if not (rules.boost or rules.bury) or not ctx.candidates:
            return
        with ctx.timed(self.name):
            scores = [c.relevance for c in ctx.candidates]
            span = max(scores) - min(scores) + 1.0
            for cand in ctx.candidates:
                if cand.item_id in rules.boost:
                    cand.relevance += span
                elif cand.item_id in rules.bury:
                    cand.relevance -= span

    def pin(self, ctx: Context) -> None:
        """The pinned items first, in the request's order, then the picked items."""
        if not ctx.rules.pin:
            return
        with ctx.timed(self.name):
            try:
                rows = self.store.get_items(ctx.rules.pin, ctx.deadline.left(), with_vectors=True)
            except StoreUnavailable as exc:
                ctx.degraded.append(f"milvus unavailable: {exc}")
                return
            seen = ctx.interacted_ids()
            pins = [rows[i] for i in ctx.rules.pin if i in rows and allowed(ctx, rows[i], seen)]
            pins = pins[: ctx.k]
            top = max((c.relevance for c in ctx.items), default=0.0)
            pinned = [
                Candidate(r["item_id"], r, {PINNED: n}, relevance=top + len(pins) - n)
                for n, r in enumerate(pins)
            ]
            ids = {c.item_id for c in pinned}
            rest = [c for c in ctx.items if c.item_id not in ids]
            ctx.items = pinned + rest[: ctx.k - len(pinned)]


class RulesConfigError(ValueError):
    """The rules file cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class SurfaceRules:
    """A surface's configured rules: exclusions and attribute filters (``filters``; its
    ``categories`` stay empty), a repeat policy and boost/bury/pin ids (``rules``)."""

    filters: Filters = field(default_factory=Filters)
    rules: Rules = field(default_factory=Rules)


NO_RULES = SurfaceRules()


def merge(configured: SurfaceRules, filters: Filters, rules: Rules) -> tuple[Filters, Rules]:
    """The request's ``filters`` and ``rules`` with a surface's configured ones.

    Filters and exclusions of both apply (the later ``min_create_time`` of the two), so a
    configured exclusion also beats a request's boost or pin. Where the two conflict the
    request wins: its repeat policy, when it sets one, replaces the configured one; an id it
    boosts is not buried by the configuration and one it buries is not boosted; its pins
    come first, the configured ones after them.
    """
    own = configured.filters
    merged = Filters(
        filters.categories,
        filters.exclude | own.exclude,
        filters.exclude_categories | own.exclude_categories,
        max(filters.min_created_at, own.min_created_at),
    )
    policy = rules if rules.repeats else configured.rules
    return merged, Rules(
        policy.allow_seen,
        policy.allow_seen_categories,
        rules.boost | (configured.rules.boost - rules.bury),
        rules.bury | (configured.rules.bury - rules.boost),
        tuple(dict.fromkeys((*rules.pin, *configured.rules.pin))),
    )


def _ids(value: object, where: str) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_CONFIGURED_IDS:
        raise RulesConfigError(f"{where}: a list of at most {MAX_CONFIGURED_IDS} item ids")
    for item in value:
        if not isinstance(item, str) or not _ID.fullmatch(item):
            raise RulesConfigError(f"{where}: {item!r} is not an id of [A-Za-z0-9_.:-]")
    return value


def _categories(value: object, where: str) -> frozenset[str]:
    if not isinstance(value, list) or not all(
        isinstance(c, str) and c.strip() and len(c.encode()) <= CATEGORY_MAX_LENGTH for c in value
    ):
        raise RulesConfigError(f"{where}: a list of category names (1-64 bytes each)")
    return frozenset(c.strip() for c in value)


def _epoch(value: object, where: str) -> int:
    """Epoch seconds from a number or an RFC 3339 time ("2024-01-01T00:00:00Z")."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return int(value)
    if isinstance(value, str):
        try:
            stamp = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if stamp.tzinfo is not None:
                return max(0, int(stamp.timestamp()))
    raise RulesConfigError(f"{where}: epoch seconds or an RFC 3339 time with a zone offset")


def parse_surface(entry: object, where: str) -> SurfaceRules:
    """One surface's rules from its JSON object (see :class:`RulesFile`)."""
    if not isinstance(entry, dict):
        raise RulesConfigError(f"{where}: expected an object")
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise RulesConfigError(f"{where}: unknown key {unknown[0]!r} (known: {sorted(_KEYS)})")
    boost = frozenset(_ids(entry.get("boost_item_ids", []), f"{where}.boost_item_ids"))
    bury = frozenset(_ids(entry.get("bury_item_ids", []), f"{where}.bury_item_ids"))
    if boost & bury:
        raise RulesConfigError(f"{where}: {sorted(boost & bury)[0]!r} is boosted and buried")
    pin = tuple(dict.fromkeys(_ids(entry.get("pin_item_ids", []), f"{where}.pin_item_ids")))
    policy = entry.get("repeat_policy", {})
    if not isinstance(policy, dict) or set(policy) - {"allow_seen", "allow_seen_categories"}:
        raise RulesConfigError(
            f"{where}.repeat_policy: an object with allow_seen and allow_seen_categories"
        )
    allow_seen = policy.get("allow_seen", False)
    if not isinstance(allow_seen, bool):
        raise RulesConfigError(f"{where}.repeat_policy.allow_seen: true or false")
    where_cats = f"{where}.repeat_policy.allow_seen_categories"
    seen_categories = _categories(policy.get("allow_seen_categories", []), where_cats)
    created = entry.get("min_create_time")
    filters = Filters(
        exclude=frozenset(_ids(entry.get("exclude_item_ids", []), f"{where}.exclude_item_ids")),
        exclude_categories=_categories(
            entry.get("exclude_categories", []), f"{where}.exclude_categories"
        ),
        min_created_at=0 if created is None else _epoch(created, f"{where}.min_create_time"),
    )
    return SurfaceRules(filters, Rules(allow_seen, seen_categories, boost, bury, pin))


@dataclass(frozen=True)
class RuleBook:
    """The configured rules: ``surfaces`` by surface id, ``default`` for every other one."""

    default: SurfaceRules = NO_RULES
    surfaces: Mapping[str, SurfaceRules] = field(default_factory=dict)

    def for_surface(self, surface: str) -> SurfaceRules:
        return self.surfaces.get(surface, self.default)

    @classmethod
    def parse(cls, text: str, source: str) -> RuleBook:
        """The rules of a rules file's text (empty text: none); RulesConfigError if bad."""
        if not text.strip():
            return cls()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RulesConfigError(f"{source}: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or set(data) - {"default", "surfaces"}:
            raise RulesConfigError(f"{source}: expected an object with default and surfaces")
        surfaces = data.get("surfaces", {})
        if not isinstance(surfaces, dict):
            raise RulesConfigError(f"{source}: surfaces must map surface ids to rules")
        for name in surfaces:
            if not _ID.fullmatch(name):
                raise RulesConfigError(f"{source}: surface {name!r} is not an id")
        return cls(
            default=parse_surface(data.get("default", {}), f"{source}: default"),
            surfaces={n: parse_surface(e, f"{source}: surfaces.{n}") for n, e in surfaces.items()},
        )


class RulesFile(WatchedFile[RuleBook]):
    """The rules file's rules, re-read when the file changes (like the API-key file).

    The file (``RECSYS_RULES_FILE``; none = no configured rules) is JSON::

        {"default": {"exclude_categories": ["Documentary"]},
         "surfaces": {"home": {"boost_item_ids": ["318"], "pin_item_ids": ["50"],
                               "bury_item_ids": ["2"], "exclude_item_ids": ["13"],
                               "min_create_time": "2000-01-01T00:00:00Z",
                               "repeat_policy": {"allow_seen_categories": ["Drama"]}}}}

    A surface with an entry gets that entry, every other surface (and a request without a
    surface) gets ``default``: a surface entry replaces the default, it does not add to it.
    The file's stamp (modification time, size, inode: a ConfigMap's symlink swap changes it)
    is looked at no more than every ``check_s`` seconds, on the request path. A file that
    cannot be read or parsed at start raises :class:`RulesConfigError` (the gateway does not
    start); on a reload the last good rules stay in force and the error is logged.
    """

    def __init__(
        self,
        path: Path | None,
        check_s: float = RELOAD_CHECK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            path, self._read, "rules file", (RulesConfigError,), check_s=check_s, clock=clock
        )

    def _read(self) -> RuleBook:
        if self.path is None:
            return RuleBook()
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RulesConfigError(f"rules file {self.path}: cannot be read ({exc})") from None
        return RuleBook.parse(text, f"rules file {self.path}")

    def for_surface(self, surface: str) -> SurfaceRules:
        """The configured rules of ``surface`` (the default for an unlisted or empty one)."""
        return self.current().for_surface(surface)
