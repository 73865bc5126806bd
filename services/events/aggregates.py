"""Online aggregates: time-decayed popularity and co-occurrence, refreshed from the stream.

The profile workers fold each applied batch into a :class:`Delta` (they already read every
user's events in order, once, and hold the user's previous history, which a pair needs) and
merge it every ``aggregates_flush_s`` into two keys of the JetStream key-value bucket
``aggregates_bucket``: ``popularity`` (item -> decayed count of users who turned positive on
it) and ``co_occurrence`` (item -> decayed counts of the items the same users liked next to
it). A merge is a compare-and-set on the key's revision, so two workers never overwrite each
other. The gateways read both keys every ``aggregates_refresh_s`` and blend them into the
popular list and the co-occurrence neighbours: feedback moves those candidates without
re-indexing the catalogue.

Scores are in the offline popularity's unit (positive users, decayed with the same
half-life), stored at a reference time ``at`` and decayed on every merge and read. The
half-life is the catalogue's: the indexing job chooses it on the events it indexes
(:func:`core.behaviour.choose_half_life`) and records it in the ``popularity`` key
(:func:`record_index`), where every merge and read finds it; the setting
``popularity_half_life_days`` overrides it. The job records there too the time its indexed
popularity is decayed to (``indexed_at``), so that a gateway decays the indexed part to the
same "now" as the online part before adding them (:attr:`Aggregates.indexed_weight`): weeks
after an index, a short half-life would otherwise let the stale indexed counts outweigh the
fresh online ones. It records there also the share of each list's slots that exploration
gives new items, chosen on the item vectors it indexed (:func:`record_exploration`,
:func:`core.exploration.choose_exploration_share`), which every gateway reads (a gateway
with ``aggregates_refresh_s`` 0 reads it once, at start); the setting ``exploration_share``
overrides it. The aggregates are
approximate by design: a worker that dies loses at most one flush interval of increments,
and each list is cut to its strongest ``aggregates_top_items`` items
(``aggregates_co_neighbours`` neighbours each), which bounds the values at a few hundred KB.
"""

from __future__ import annotations

import json
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import nats.js.errors
from nats.js.kv import KeyValue

from core.behaviour import DEFAULT_HALF_LIFE_DAYS, SECONDS_PER_DAY
from core.config import Settings
from services.events.log import EventLog

POPULARITY = "popularity"
CO_OCCURRENCE = "co_occurrence"
PAIR_SEEDS = 10  # previous history items each new positive is paired with
#: what the indexing job records in the ``popularity`` key (:func:`record_index`)
INDEX_KEYS = ("half_life_s", "indexed_at", "exploration_share")


def half_life_s(settings: Settings, popularity_doc: Mapping[str, object]) -> float:
    """The aggregates' half-life in seconds: the setting when set, else the one the indexing
    job recorded, else :data:`core.behaviour.DEFAULT_HALF_LIFE_DAYS`."""
    if settings.popularity_half_life_days is not None:
        return settings.popularity_half_life_days * SECONDS_PER_DAY
    recorded = popularity_doc.get("half_life_s")
    return float(recorded) if recorded else DEFAULT_HALF_LIFE_DAYS * SECONDS_PER_DAY  # type: ignore[arg-type]


def decay(age_s: float, half_life_s: float) -> float:
    """The weight left after ``age_s`` seconds (never above 1: future times count as now)."""
    return float(0.5 ** (max(age_s, 0.0) / half_life_s))


@dataclass
class Delta:
    """Increments not yet merged, each already decayed to ``at``."""

    at: float = field(default_factory=time.time)
    popularity: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    pairs: dict[str, dict[str, float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float))
    )

    def __bool__(self) -> bool:
        return bool(self.popularity or self.pairs)

    def add_user(
        self,
        previous: Sequence[str],
        positives: Iterable[tuple[str, float]],
        half_life_s: float,
    ) -> None:
        """One user's newly applied positives (item, event time), oldest first, after the
        ``previous`` history (newest first): an item counts once per user (a repeat of an
        item already in the history is no new user for it), and pairs with the user's most
        recent other items."""
        history = list(previous)
        for item, ts in positives:
            if item in history:
                continue
            weight = decay(self.at - ts, half_life_s)
            self.popularity[item] += weight
            for other in history[:PAIR_SEEDS]:
                self.pairs[item][other] += weight
                self.pairs[other][item] += weight
            history.insert(0, item)


def _decoded(value: bytes | None) -> dict[str, object]:
    if not value:
        return {}
    return dict(json.loads(zlib.decompress(value)))


def _encoded(doc: Mapping[str, object]) -> bytes:
    return zlib.compress(json.dumps(doc, separators=(",", ":")).encode(), 6)


def _top(scores: Mapping[str, float], n: int) -> dict[str, float]:
    best = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    return {k: round(v, 6) for k, v in best if v > 1e-6}


def merge_popularity(
    doc: Mapping[str, object], delta: Delta, half_life_s: float, top: int
) -> dict[str, object]:
    at = max(float(doc.get("at", delta.at)), delta.at)  # type: ignore[arg-type]
    old = decay(at - float(doc.get("at", at)), half_life_s)  # type: ignore[arg-type]
    new = decay(at - delta.at, half_life_s)
    scores: dict[str, float] = defaultdict(float)
    for item, value in dict(doc.get("scores", {})).items():  # type: ignore[call-overload]
        scores[item] += float(value) * old
    for item, value in delta.popularity.items():
        scores[item] += value * new
    recorded = {k: doc[k] for k in INDEX_KEYS if k in doc}
    return {"at": at, "scores": _top(scores, top), **recorded}


def merge_co_occurrence(
    doc: Mapping[str, object], delta: Delta, half_life_s: float, top: int, neighbours: int
) -> dict[str, object]:
    at = max(float(doc.get("at", delta.at)), delta.at)  # type: ignore[arg-type]
    old = decay(at - float(doc.get("at", at)), half_life_s)  # type: ignore[arg-type]
    new = decay(at - delta.at, half_life_s)
    pairs: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for item, row in dict(doc.get("pairs", {})).items():  # type: ignore[call-overload]
        for other, value in row.items():
            pairs[item][other] += float(value) * old
    for item, row in delta.pairs.items():
        for other, value in row.items():
            pairs[item][other] += value * new
    strength = {item: sum(row.values()) for item, row in pairs.items()}
    kept = _top(strength, top)
    return {"at": at, "pairs": {item: _top(pairs[item], neighbours) for item in kept}}


async def _update(
    kv: KeyValue, key: str, fold: Callable[[dict[str, object]], dict[str, object]], attempts: int
) -> dict[str, object]:
    """``key`` := ``fold(its value)`` by compare-and-set, retried on a conflict; the value
    written."""
    for _ in range(attempts):
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            doc = fold({})
            try:
                await kv.create(key, _encoded(doc))
                return doc
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
        doc = fold(_decoded(entry.value))
        try:
            await kv.update(key, _encoded(doc), last=entry.revision)
            return doc
        except nats.js.errors.KeyWrongLastSequenceError:
            continue  # another writer changed it meanwhile: fold into its value
    raise RuntimeError(f"aggregates: {key} kept changing; {attempts} updates lost")


async def merge(log: EventLog, delta: Delta, attempts: int = 20) -> float:
    """Merge ``delta`` into both keys, each by compare-and-set (retried on a conflict);
    returns the half-life (seconds) the merge decayed with, for the next increments."""
    s = log.settings
    kv = await log.bucket(s.aggregates_bucket, create=True)
    used = half_life_s(s, {})

    def popularity(doc: dict[str, object]) -> dict[str, object]:
        nonlocal used
        used = half_life_s(s, doc)
        return merge_popularity(doc, delta, used, s.aggregates_top_items)

    await _update(kv, POPULARITY, popularity, attempts)
    await _update(
        kv,
        CO_OCCURRENCE,
        lambda doc: merge_co_occurrence(
            doc, delta, used, s.aggregates_top_items, s.aggregates_co_neighbours
        ),
        attempts,
    )
    return used


async def record_index(
    log: EventLog, days: float, indexed_at: float | None, attempts: int = 20
) -> None:
    """Record the catalogue's popularity half-life (chosen by the indexing job) and the time
    its indexed popularity is decayed to (None: no positive event indexed) where the profile
    workers' merges and the gateways' reads find them."""
    kv = await log.bucket(log.settings.aggregates_bucket, create=True)

    def recorded(doc: dict[str, object]) -> dict[str, object]:
        kept = {k: v for k, v in doc.items() if k != "indexed_at"}
        at = {} if indexed_at is None else {"indexed_at": indexed_at}
        return {**kept, "half_life_s": days * SECONDS_PER_DAY, **at}

    await _update(kv, POPULARITY, recorded, attempts)


async def record_exploration(log: EventLog, share: float, attempts: int = 20) -> None:
    """Record the exploration share the indexing job chose for this catalogue where the
    gateways read it (:attr:`Aggregates.exploration_share`)."""
    kv = await log.bucket(log.settings.aggregates_bucket, create=True)
    await _update(kv, POPULARITY, lambda doc: {**doc, "exploration_share": share}, attempts)


@dataclass(frozen=True)
class Aggregates:
    """What a gateway reads: scores decayed to ``at`` (seconds since the epoch), and the
    weight the indexed popularity keeps at ``at`` (its decay since the index's reference
    time; 1 when no index recorded one), so that both are added at the same time."""

    at: float = 0.0
    popularity: dict[str, float] = field(default_factory=dict)
    co_occurrence: dict[str, list[str]] = field(default_factory=dict)  # best first
    indexed_weight: float = 1.0
    exploration_share: float | None = None  # the indexing job's choice; None: none recorded

    def __bool__(self) -> bool:
        return bool(self.popularity or self.co_occurrence)


async def read(log: EventLog, now: float | None = None) -> Aggregates:
    """Both keys, decayed to ``now``; empty when no worker merged anything yet."""
    s = log.settings
    now = time.time() if now is None else now
    try:
        kv = await log.bucket(s.aggregates_bucket)
    except nats.js.errors.BucketNotFoundError:
        return Aggregates(now)
    docs: dict[str, dict[str, object]] = {}
    for key in (POPULARITY, CO_OCCURRENCE):
        try:
            docs[key] = _decoded((await kv.get(key)).value)
        except nats.js.errors.KeyNotFoundError:
            docs[key] = {}
    return decayed(docs[POPULARITY], docs[CO_OCCURRENCE], s, now)


def decayed(
    pop: Mapping[str, object], co: Mapping[str, object], settings: Settings, now: float
) -> Aggregates:
    """The two keys' values as a gateway uses them at ``now``."""
    half_life = half_life_s(settings, pop)
    factor = decay(now - float(pop.get("at", now)), half_life)  # type: ignore[arg-type]
    scores = {k: float(v) * factor for k, v in dict(pop.get("scores", {})).items()}  # type: ignore[call-overload]
    neighbours = {
        item: [o for o, _ in sorted(row.items(), key=lambda kv: (-kv[1], kv[0]))]
        for item, row in dict(co.get("pairs", {})).items()  # type: ignore[call-overload]
    }
    indexed_at = pop.get("indexed_at")
    indexed = 1.0 if indexed_at is None else decay(now - float(indexed_at), half_life)  # type: ignore[arg-type]
    share = pop.get("exploration_share")
    return Aggregates(now, scores, neighbours, indexed, None if share is None else float(share))  # type: ignore[arg-type]
