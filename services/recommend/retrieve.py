"""Stage ``retrieval``: candidates from ANN, co-occurrence, segment and global popularity.

Each source returns its own ranked list; lists are merged by weighted reciprocal-rank fusion
(:func:`core.fusion.rrf`), which needs no score calibration between sources. Items the user
has seen, excluded ids and items outside the category filter never survive. Without Milvus
the personal sources are skipped (and the answer says so); the global popularity comes from
a cache in the gateway, so there is always something to answer with.
"""

from __future__ import annotations

import heapq
import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace

import numpy as np

from core.config import Settings
from core.exploration import DEFAULT_EXPLORATION_SHARE
from core.fusion import fuse_ids
from core.ranking_features import CO_SEEDS, CatalogueClock, co_occurrence_scores
from core.sequence_inputs import model_inputs
from services.deadline import Deadline, DeadlineExceeded
from services.inference.triton_client import InferenceUnavailable, TritonClient
from services.recommend.context import Candidate, Context, Filters, Stage
from services.vectors.store import QUERY_LIMIT, Row, StoreUnavailable, VectorStore

log = logging.getLogger(__name__)


#: What the popularity refresh reads of every item: the full rows are read for the top only.
POPULARITY_FIELDS = ("item_id", "popularity", "created_at")
ROWS_TIMEOUT_S = 10.0  # the background read of the top's rows
#: a catalogue larger than the item cache is read above this share of the last top's least
#: popularity (all of it again when fewer than the top's size are found there)
FLOOR_SHARE = 0.5
#: the most Milvus counts one search for a first floor or the newest item's time makes
SEARCH_STEPS = 64
#: the least popularity a Milvus filter tells from 0 (it is written with six decimals)
LEAST_POPULARITY = 1e-6
DAY_S = 86_400


class PopularItems:
    """Top items by popularity, cached in the gateway, with category and exclusion filters
    applied on read.

    Cold-start users get these, and so does every user while Milvus is unreachable: the
    cache is filled from Milvus at start and refreshed in the background, and it keeps its
    last good contents when a refresh fails. The online aggregates (:meth:`set_online`,
    refreshed from the event stream by the profile workers) add their decayed popularity to
    the catalogue's, both decayed to the same time, and their co-occurrence neighbours to the
    indexed ones, so feedback moves both without re-indexing.

    A refresh reads three small fields of every item (:data:`POPULARITY_FIELDS`) and the
    full rows of the top ``size`` only. The online scores only add, so the combined top is
    always among the catalogue's top and the items the online aggregates name: a rank over
    those, not over the catalogue, and a read of the rows of the few lifted ones. Where the
    catalogue is larger than the item cache (no scan fills it), refreshes read only the
    items above a floor (Milvus filters), the newest items for the clock, and the popularity
    of the online items below that by id: a catalogue of millions costs each refresh its
    top, not its size. The floor is :data:`FLOOR_SHARE` of the last top's least popularity;
    the first refresh finds one, and the newest item's time, by Milvus counts
    (:func:`_threshold`), so that a gateway's start does not wait for a read of every item.
    Where fewer than ``size`` items have any popularity, the refresh reads those and the
    first of the rest in id order.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: list[Row] = []  # the served top, best first
        self._popularity: dict[str, float] = {}  # every item's catalogue popularity
        self._static: list[str] = []  # the catalogue's top ids, best first
        self._rows: dict[str, Row] = {}  # the full rows of the static and the served top
        # where rows of lifted items are read; set by the first refresh, which dates the clock
        self._store: VectorStore | None = None
        self._online: Mapping[str, float] = {}
        self._indexed_weight = 1.0
        self._neighbours: Mapping[str, Sequence[str]] = {}
        self._clock = CatalogueClock(top_popularity=0.0, now=time.time())
        self._exploration_share: float | None = None
        self._floor: float | None = None  # what the next refresh reads above, if not all
        self._complete = True  # _popularity holds every item (else: those above the floor)
        self._absent: set[str] = set()  # online ids with no row, since the last refresh
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def refresh(self, store: VectorStore) -> bool:
        try:
            light, complete = self._read(store)
            popularity = {r["item_id"]: float(r["popularity"]) for r in light}
            static = _best(popularity, self.size)
            rows = store.get_items(static, ROWS_TIMEOUT_S)  # the item cache's, when filled
            newest = light
            if not complete:  # the newest item may lie below the floor: those since the last
                dated = self._store is not None  # a refresh has read the clock's time
                since = int(self._clock.now) if dated else _newest_time(store, light)
                newest = store.items_where(POPULARITY_FIELDS, min_created_at=since)
        except StoreUnavailable as exc:
            log.warning("popularity refresh failed, keeping %d cached: %s", len(self), exc)
            return False
        created = [int(r.get("created_at") or 0) for r in newest]
        clock = CatalogueClock(
            top_popularity=popularity[static[0]] if static else 0.0,
            now=float(max(created)) if any(created) else self._clock.now,
        )
        floor = FLOOR_SHARE * popularity[static[-1]] if len(static) == self.size else 0.0
        with self._lock:
            self._store, self._popularity, self._clock = store, popularity, clock
            self._static = [i for i in static if i in rows]  # deleted since the scan: gone
            self._rows = dict(rows)
            self._complete, self._absent = complete, set()
            self._floor = floor if floor > 0 else None
        self._rank()
        return True

    def _read(self, store: VectorStore) -> tuple[list[Row], bool]:
        """:data:`POPULARITY_FIELDS` of every item, or, when the catalogue is larger than
        the item cache and enough items lie above the floor (the last top's, else one found
        by counting), of those: (rows, every item)."""
        fits = store.item_cache_holds_catalogue()
        if not fits:
            floor = self._floor if self._floor is not None else _first_floor(store, self.size)
            if floor is None:  # fewer than the top's size have any popularity
                return self._read_the_few_popular(store), False
            light = store.items_where(POPULARITY_FIELDS, min_popularity=floor)
            if sum(float(r["popularity"]) >= floor for r in light) >= self.size:
                return light, False
        return store.all_items(POPULARITY_FIELDS, fill_cache=True, fits=fits), True

    def _read_the_few_popular(self, store: VectorStore) -> list[Row]:
        """The items with any popularity, and the first of the others in id order to fill
        the top (ties by id, as over every item): two reads whatever the catalogue's size."""
        light = store.items_where(POPULARITY_FIELDS, min_popularity=LEAST_POPULARITY)
        rest = self.size - len(light)
        return light + store.least_popular_items(
            POPULARITY_FIELDS, rest, LEAST_POPULARITY, ROWS_TIMEOUT_S
        )

    def set_online(
        self,
        popularity: Mapping[str, float],
        neighbours: Mapping[str, Sequence[str]],
        indexed_weight: float = 1.0,
    ) -> None:
        """The online aggregates' decayed popularity (same unit as the catalogue's) and
        co-occurrence neighbours (best first); ``indexed_weight``: what the catalogue's
        popularity keeps at the time the online one is decayed to
        (:attr:`services.events.aggregates.Aggregates.indexed_weight`)."""
        with self._lock:
            self._online, self._neighbours = dict(popularity), dict(neighbours)
            self._indexed_weight = indexed_weight
        self._rank()

    def _rank(self) -> None:
        """The served top: the catalogue's top and the online items, by combined score; the
        rows of lifted items read first, outside the lock (then ranked again: a refresh may
        have come in between). An item with no row (deleted, or Milvus unreachable until the
        next refresh) gives its place to the next one."""
        self._read_online_popularity()
        with self._lock:
            ranked = self._ranked_ids()
            store, missing = self._store, [i for i in ranked[: self.size] if i not in self._rows]
            if not missing or store is None:
                self._serve(ranked, self._rows)
                return
        read: dict[str, Row] = {}
        try:
            read = store.get_items(missing, ROWS_TIMEOUT_S)
        except StoreUnavailable as exc:
            log.warning("rows of %d items the online scores lift: %s", len(missing), exc)
        with self._lock:
            self._serve(self._ranked_ids(), {**self._rows, **read})

    def _read_online_popularity(self) -> None:
        """The catalogue popularity of online items the last refresh did not read (those
        below its floor), by id, outside the lock; ids without a row are remembered as such
        until the next refresh. Unread (Milvus unreachable), an item waits for the next."""
        with self._lock:
            store, known, absent = self._store, self._popularity, self._absent
            unknown = [i for i in self._online if i not in known and i not in absent]
            if self._complete or store is None or not unknown:
                return
        try:
            light = store.items_where(POPULARITY_FIELDS, ids=unknown)
        except StoreUnavailable as exc:
            log.warning("popularity of %d online items: %s", len(unknown), exc)
            return
        found = {r["item_id"]: float(r["popularity"]) for r in light}
        with self._lock:
            if self._popularity is known:  # no refresh came in between
                known.update(found)
                absent.update(i for i in unknown if i not in found)

    def _serve(self, ranked: list[str], rows: dict[str, Row]) -> None:
        """The first ``size`` of ``ranked`` that have a row become the served top; only the
        rows of it and of the catalogue's top are kept. Called under the lock."""
        top = [i for i in ranked if i in rows][: self.size]
        keep = set(self._static) | set(top)
        self._rows = {i: r for i, r in rows.items() if i in keep}
        self._items = [rows[i] for i in top]

    def _ranked_ids(self) -> list[str]:
        """The catalogue's top and the online items by combined score, best first: the first
        ``size`` are the top, the next ``size`` its reserve for items without a row."""
        online = self._online
        if not online:
            return list(self._static)
        weight, catalogue = self._indexed_weight, self._popularity
        pool = set(self._static) | {i for i in online if i in catalogue}
        return _best({i: catalogue[i] * weight + online.get(i, 0.0) for i in pool}, 2 * self.size)

    def set_exploration_share(self, share: float | None) -> None:
        """The share of each list's slots for new items that the indexing job chose for
        this catalogue (:func:`core.exploration.choose_exploration_share`); None: none."""
        if share != self._exploration_share:
            log.info("exploration share recorded by the indexing job: %s", share)
        self._exploration_share = share

    def exploration_share(self) -> float:
        """The recorded share, else :data:`core.exploration.DEFAULT_EXPLORATION_SHARE`."""
        share = self._exploration_share
        return DEFAULT_EXPLORATION_SHARE if share is None else share

    def neighbours(self, item_id: str) -> Sequence[str]:
        """The item's online co-occurrence neighbours, best first (none before any)."""
        return self._neighbours.get(item_id, ())

    def discard(self, item_id: str) -> None:
        """Forget a deleted item at once (the next refresh would, a while later)."""
        with self._lock:
            self._items = [r for r in self._items if r["item_id"] != item_id]
            self._static = [i for i in self._static if i != item_id]
            self._popularity.pop(item_id, None)
            self._rows.pop(item_id, None)

    def clock(self) -> CatalogueClock:
        """The catalogue's top popularity and newest item time, for the ranker's features
        (relative, so they do not depend on the catalogue's size or the wall clock)."""
        with self._lock:
            return self._clock

    def top(
        self, k: int, categories: Sequence[str] = (), exclude: Collection[str] = ()
    ) -> list[Row]:
        wanted = set(categories)
        skip = exclude if isinstance(exclude, set | frozenset) else set(exclude)
        with self._lock:
            items = self._items
        out = []
        for row in items:
            if row["item_id"] in skip or (wanted and not wanted.intersection(row["categories"])):
                continue
            out.append(row)
            if len(out) == k:
                break
        return out


def _first_floor(store: VectorStore, size: int) -> float | None:
    """A popularity with at least ``size`` items at or above it and, where ties allow, fewer
    than one query returns (:data:`~services.vectors.store.QUERY_LIMIT`), found by Milvus
    counts: doubled from 1, then bisected geometrically (the filter's six decimals are the
    grid). None where fewer than ``size`` items have any popularity."""
    count = store.count_items
    if count(min_popularity=LEAST_POPULARITY) < size:
        return None
    return _threshold(
        lambda t: count(min_popularity=t),
        lo=LEAST_POPULARITY,
        start=1.0,
        grow=lambda t: 2 * t,
        halfway=lambda lo, hi: round(math.sqrt(lo * hi), 6),
        least=size,
        most=QUERY_LIMIT - 1,
    )


def _newest_time(store: VectorStore, read: Sequence[Row]) -> int:
    """A creation time at or below the newest item's with at least one item and, where ties
    allow, fewer than one query returns at or after it, found by Milvus counts from the
    newest among the rows ``read``, in day steps doubled, then bisected."""
    known = max((int(r.get("created_at") or 0) for r in read), default=0)
    since = _threshold(
        lambda t: store.count_items(min_created_at=int(t)),
        lo=float(known),
        start=float(known),
        grow=lambda t: known + max(2 * (t - known), DAY_S),
        halfway=lambda lo, hi: float((int(lo) + int(hi)) // 2),
        least=1,
        most=QUERY_LIMIT - 1,
    )
    return int(since)


def _threshold(
    count: Callable[[float], int],
    *,
    lo: float,
    start: float,
    grow: Callable[[float], float],
    halfway: Callable[[float, float], float],
    least: int,
    most: int,
) -> float:
    """A ``t`` with ``least <= count(t) <= most``, where ``count`` falls as ``t`` grows and
    ``count(lo) >= least``: from ``start``, grown until fewer than ``least`` are counted,
    then bisected between the last two. ``lo`` where ties leave no such ``t`` (or the
    :data:`SEARCH_STEPS` run out): the caller's read then takes more than ``most``."""
    t, hi = start, None
    for _ in range(SEARCH_STEPS):
        if hi is not None:
            t = halfway(lo, hi)
            if not lo < t < hi:
                break
        n = count(t)
        if least <= n <= most:
            return t
        if n < least:
            hi = t
        else:
            lo = t
            if hi is None:
                t = grow(t)
    return lo


def _best(scores: Mapping[str, float], n: int) -> list[str]:
    """The ``n`` ids of the highest scores, best first, ties by id."""
    return heapq.nsmallest(n, scores, key=lambda i: (-scores[i], i))


def interleaved(first: Sequence[str], second: Sequence[str]) -> list[str]:
    """Two ranked lists taken in turns, without repeats: online neighbours move candidates
    without drowning the indexed ItemKNN ones."""
    if not second:  # no online neighbours yet (the common case): the first list, deduplicated
        return list(dict.fromkeys(first))
    out: dict[str, None] = {}
    for i in range(max(len(first), len(second))):
        for source in (first, second):
            if i < len(source):
                out.setdefault(source[i], None)
    return list(out)


class Retriever:
    """The candidate sources, one method each, and their fusion.

    Only the ANN is a search; co-occurrence, segment and global popularity are id lists
    (neighbours on the history's rows, the segment's popular items, the gateway's popularity
    cache) whose rows come back in one Milvus read (:meth:`rows`), so a request costs two
    round trips here, not five. Segment rows change only when the segments are refitted:
    they are cached for ``segment_ttl_s``.
    """

    def __init__(self, store: VectorStore, popular: PopularItems, segment_ttl_s: float = 60.0):
        self.store = store
        self.popular = popular
        self.segment_ttl_s = segment_ttl_s
        self._segments: dict[str, tuple[float, list[str]]] = {}

    def ann(self, vector: np.ndarray, n: int, filters: Filters, deadline: Deadline) -> list[Row]:
        return self.store.search_items(
            vector,
            n,
            deadline.left(),
            filters.categories,
            sorted(filters.exclude),
            with_vectors=True,
        )

    def co_occurrence(
        self, history: Sequence[Row], n: int, exclude: Collection[str]
    ) -> tuple[list[str], dict[str, str], dict[str, float] | None]:
        """The best ``3 n`` neighbours of recent history items, scored by recency of the seed
        and their rank (:func:`core.ranking_features.co_occurrence_scores`), and the seed's
        title of each (its explanation). Each seed's neighbours: the indexed ones and the
        online ones (:meth:`PopularItems.neighbours`) taken in turns. Third: the scores
        themselves when they are the indexed neighbours' alone (no seed has online ones and
        no indexed list repeats an id), which the ranker's feature then reuses."""
        indexed = [h.get("co_items") or [] for h in history[:CO_SEEDS]]  # the seeds it reads
        merged = [
            interleaved(first, self.popular.neighbours(h["item_id"]))
            for h, first in zip(history, indexed, strict=False)
        ]
        scores, seed = co_occurrence_scores(merged)
        ranked = sorted((i for i in scores if i not in exclude), key=lambda i: -scores[i])
        same = all(list(a) == b for a, b in zip(indexed, merged, strict=True))
        titles = {item: history[index]["title"] for item, index in seed.items()}
        return ranked[: 3 * n], titles, scores if same else None

    def segment(
        self, segment_id: str, n: int, exclude: Collection[str], deadline: Deadline
    ) -> list[str]:
        """The segment's popular items not excluded, at most ``3 n`` (cached segment row)."""
        now = time.monotonic()
        cached = self._segments.get(segment_id)
        if cached is None or now - cached[0] > self.segment_ttl_s:
            row = self.store.get_segment(segment_id, deadline.left())
            cached = (now, list(row["popular_items"]) if row else [])
            self._segments[segment_id] = cached
        return [i for i in cached[1] if i not in exclude][: 3 * n]

    def rows(self, ids: Sequence[str], deadline: Deadline) -> dict[str, Row]:
        """The rows (with vectors) of every listed id, in one read."""
        return self.store.get_items(ids, deadline.left(), with_vectors=True)

    def admitted(
        self,
        lists: Mapping[str, Sequence[str]],
        also: Sequence[str],
        filters: Filters,
        n: int,
        deadline: Deadline,
    ) -> tuple[dict[str, list[Row]], dict[str, Row]]:
        """Each id list's first ``n`` rows that ``filters`` admit (in list order), and the
        rows read (those of ``also`` among them), reading only as far down each list as it
        must. The lists hold up to ``3 n`` ids with the excluded ones already gone, so
        without attribute filters the first ``n`` ids that have rows are the answer: one read
        of those first (copying ~700 cached rows per request cost more than the fusion), the
        rest of a list only when it came out short (an id with no row). With attribute
        filters every id is read at once, as one round trip."""
        depth = n if not filters.by_attributes else None
        rows = self.rows([*(i for ids in lists.values() for i in ids[:depth]), *also], deadline)

        def take(ids: Sequence[str]) -> list[Row]:
            return filters.admitted(rows[i] for i in ids if i in rows)[:n]

        out = {name: take(ids[:depth]) for name, ids in lists.items()}
        short = [name for name, ids in lists.items() if len(out[name]) < n and len(ids) > n]
        if depth is not None and short:
            rest = [i for name in short for i in lists[name][depth:] if i not in rows]
            rows.update(self.rows(rest, deadline) if rest else {})
            out.update({name: take(lists[name]) for name in short})
        return out, rows

    def global_popular(self, n: int, filters: Filters) -> list[Row]:
        return self.popular.top(n, filters.categories, filters.exclude)

    @staticmethod
    def fuse(
        lists: Mapping[str, Sequence[Row | tuple[Row, str]]],
        weights: Mapping[str, float],
        n: int,
    ) -> list[Candidate]:
        """Weighted reciprocal-rank fusion of per-source lists into the top ``n``, each weighted
        source's first ``SOURCE_QUOTA * n`` items kept (:func:`core.fusion.fuse_ids`, which
        the feature ranker's training replay runs too)."""
        ids: dict[str, list[str]] = {}
        ranks: dict[str, dict[str, int]] = {}
        rows: dict[str, Row] = {}
        because_of: dict[str, dict[str, str]] = {}
        for source, entries in lists.items():
            ids[source] = []
            for rank, entry in enumerate(entries):
                row, because = entry if isinstance(entry, tuple) else (entry, "")
                item = row["item_id"]
                ids[source].append(item)
                seen = ranks.get(item)
                if seen is None:
                    ranks[item] = {source: rank}
                    rows[item] = row
                else:
                    if "vector" not in rows[item] and "vector" in row:
                        rows[item] = row
                    seen[source] = rank
                if because:
                    because_of.setdefault(item, {})[source] = because
        return [
            Candidate(i, rows[i], ranks[i], because_of.get(i, {}), score)
            for i, score in fuse_ids(ids, weights, n)
        ]


#: The share of retrieval's time left that the sequence model may take: the Milvus read of
#: the sources' rows comes after it, and a hung Triton must cost the sequence source only.
SEQUENCE_SHARE = 0.5


class SequenceSource:
    """The sequence model on Triton as a candidate source: the user's newest events (kept on
    the user row) and the other sources' items in, its best items out, in one request. The
    scores of both go on the context (``sequence_scores``), so the ranking stage has the
    model's score of every candidate without asking again; its inputs stay there too, for a
    candidate that was not asked about. It waits at most :data:`SEQUENCE_SHARE` of the time
    left."""

    def __init__(self, triton: TritonClient, ready: Callable[[str], bool]) -> None:
        self.triton = triton
        self.ready = ready

    def __call__(
        self, ctx: Context, n: int, exclude: Collection[str], asked: Sequence[str] = ()
    ) -> list[str]:
        profile = ctx.profile
        events = (profile or {}).get("events") or {}
        if profile is None or not events.get("items") or not self.ready(ctx.release):
            return []
        # every kept event, unpadded: the served model keeps the newest it reads
        size = len(events["items"])
        inputs = {k: v[0] for k, v in model_inputs(events, profile["history_size"], size).items()}
        asked = list(dict.fromkeys(asked))
        budget = ctx.deadline.reserve(1.0 - SEQUENCE_SHARE)
        try:
            result = self.triton.sequence(inputs, asked, budget.left(), ctx.release or None)
        except (InferenceUnavailable, DeadlineExceeded) as exc:
            ctx.degraded.append(f"sequence model unavailable: {exc}")
            return []
        ctx.sequence_inputs = inputs
        ctx.sequence_scores = {
            **dict(zip(asked, result.candidate_scores.tolist(), strict=True)),
            **dict(zip(result.top_items, result.top_scores.tolist(), strict=True)),
        }
        return [i for i in result.top_items if i not in exclude][:n]


def ann_limit(n: int, searched: Filters, kept: Filters) -> int:
    """How many ANN hits to ask for so that ``n`` survive ``kept``, given that Milvus applied
    ``searched`` (the category filter and the recent history): ``n`` plus the ids only
    ``kept`` excludes, at most ``2 n``; ``2 n`` under attribute conditions that Milvus did not
    apply. Every hit costs its share of the search and a row read."""
    if kept.exclude_categories or kept.min_created_at:
        return 2 * n
    return n + min(n, len(kept.exclude - searched.exclude))


def query_vector(profile: Row | None, history: Sequence[Row], from_history: bool) -> np.ndarray:
    """The mean item vector of the recent history (cold-start users, and everyone with
    ``ann_query=history``), else the user-tower vector."""
    if profile is not None and not from_history and "vector" in profile:
        return np.asarray(profile["vector"], dtype=np.float32)
    mean = np.mean([h["vector"] for h in history], axis=0)
    return (mean / (np.linalg.norm(mean) or 1.0)).astype(np.float32)


class Retrieve(Stage):
    """Sets ``candidates``: the top ``rank_candidates`` of the fused sources, with vectors.

    The fusion weights are the variant's ``retrieval_mix``, else the settings'. A Milvus
    failure here costs the personal sources, not the answer.
    """

    name = "retrieval"

    def __init__(
        self,
        settings: Settings,
        store: VectorStore,
        retriever: Retriever,
        sequence: SequenceSource | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.retriever = retriever
        self.sequence = sequence
        self.history_query = settings.ann_query == "history"

    def run(self, ctx: Context) -> None:
        n = self.settings.rank_candidates
        profile, history, filters = ctx.profile, ctx.history, ctx.filters
        # Milvus filters the ANN search by the recent history (a short expression); every
        # source is then filtered in memory by everything the user has interacted with.
        recent = set() if ctx.rules.repeats else set(ctx.history_ids)  # repeat policy
        seen = Filters(filters.categories, filters.exclude | recent)
        seen_all = Filters(filters.categories, seen.exclude | ctx.seen_ids())
        lists: dict[str, Sequence[Row | tuple[Row, str]]] = {}
        popular = self.retriever.global_popular(n, seen_all)  # cached rows, no vectors
        try:
            co_ids, seed_of, ctx.co_scores = self.retriever.co_occurrence(
                history, n, seen_all.exclude
            )
            segment_ids = (
                self.retriever.segment(profile["segment"], n, seen_all.exclude, ctx.deadline)
                if profile and profile["segment"]
                else []
            )
            ann_rows: list[Row] = []
            if history:  # before the sequence model, which scores its hits in its request
                query = query_vector(profile, history, ctx.cold or self.history_query)
                hits = self.retriever.ann(query, ann_limit(n, seen, seen_all), seen, ctx.deadline)
                ann_rows = seen_all.admitted(hits)[:n]
            popular_ids = [r["item_id"] for r in popular]
            asked = [*popular_ids, *co_ids, *segment_ids, *(r["item_id"] for r in ann_rows)]
            seq_ids = self.sequence(ctx, 3 * n, seen_all.exclude, asked) if self.sequence else []
            ids = {"co_occurrence": co_ids, "segment": segment_ids, "sequence": seq_ids}
            found, rows = self.retriever.admitted(ids, popular_ids, seen_all, n, ctx.deadline)
            popular = [rows.get(r["item_id"], r) for r in popular]
            if history:  # the hits reach the answer only when every Milvus read succeeded
                lists["ann"] = ctx.ann_rows = ann_rows
                co = found["co_occurrence"]
                lists["co_occurrence"] = [(r, seed_of[r["item_id"]]) for r in co]
            if segment_ids:
                lists["segment"] = found["segment"]
            if seq_ids:
                lists["sequence"] = found["sequence"]
        except StoreUnavailable as exc:
            ctx.degraded.append(f"milvus unavailable: {exc}")
        lists["popular"] = popular
        weights = ctx.variant.retrieval_mix or self.settings.retrieval_weights
        ctx.candidates = Retriever.fuse(lists, weights, n)
        self._attach_vectors(ctx)

    def _attach_vectors(self, ctx: Context) -> None:
        """Vectors for the candidates that came without (popularity), for MMR."""
        missing = [c.item_id for c in ctx.candidates if "vector" not in c.row]
        if not missing:
            return
        try:
            rows = self.store.get_items(missing, ctx.deadline.left(), with_vectors=True)
        except StoreUnavailable as exc:
            if not ctx.degraded:
                ctx.degraded.append(f"milvus unavailable: {exc}")
            return
        for cand in ctx.candidates:
            if cand.item_id in rows:
                cand.row = {**cand.row, **rows[cand.item_id]}


class PopularOnly(Stage):
    """The answer when Milvus failed the request: the cached global popularity under the
    request's filters, less what the user has seen when the profile was read before the
    failure, relevance its popularity share. Sets ``items``, ``candidates`` and
    ``reasons``; the caller records why it degraded."""

    name = "retrieval"

    def __init__(self, retriever: Retriever) -> None:
        self.retriever = retriever

    def run(self, ctx: Context) -> None:
        filters = replace(ctx.filters, exclude=ctx.filters.exclude | ctx.seen_ids())
        popular = self.retriever.global_popular(4 * ctx.k, filters)
        rows = [r for r in popular if filters.admits(r)][: ctx.k]  # attribute filters
        top = max((float(r["popularity"]) for r in rows), default=1.0) or 1.0
        items = [Candidate(r["item_id"], r, {"popular": i}) for i, r in enumerate(rows)]
        for cand in items:
            cand.relevance = float(cand.row["popularity"]) / top
        ctx.items = ctx.candidates = items
        ctx.reasons = ["popular overall"] * len(items)
