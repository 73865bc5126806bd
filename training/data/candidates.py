"""The feature ranker's training data: the gateway's candidates, replayed at past points.

At a cut-off ``t`` the catalogue is what indexing would have written then (time-decayed
popularity, co-occurrence neighbours and first-seen times from the events before ``t``). Each
user active after ``t`` reveals their first ``fold_in`` events (as ``IngestEvents`` would),
then gets the candidates the gateway's sources would return (ANN on the mean item vector of
the recent history, co-occurrence neighbours of the recent items, global popularity, the
sequence model's best items; every item the user ever touched excluded), fused into the top
``candidates`` as the gateway fuses them (:func:`core.fusion.fuse_ids` with its retrieval
weights), each a row of :data:`core.ranking_features.FEATURES`. (Without ``weights``, the
union of every source's list: what the replay gave before the fusion was replayed.)
The label is whether the candidate is among the user's next ``targets`` new positives. So
the negatives are the retrieval candidates themselves: what the ranker will see when served.

Cut-offs inside the training period give training groups; the training/validation split
gives validation groups (its targets lie after the training period; nothing from it is
used to fit). Logged exposures (:mod:`training.data.exposures`) give more training groups
(:func:`exposure_groups`): the items a response showed, labelled the same way, so that what
a user was shown and did not go on to like is a negative the replay cannot invent.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from core.behaviour import (
    DEFAULT_HALF_LIFE_DAYS,
    co_occurrence,
    first_seen,
    interests,
    item_popularity,
)
from core.fusion import fuse_ids
from core.milvus_schema import CO_ITEMS
from core.ranking_features import (
    CatalogueClock,
    UserSide,
    co_occurrence_scores,
    feature_matrix,
)


@dataclass(frozen=True)
class CandidateConfig:
    """How the gateway retrieves (keep equal to its settings) and how groups are drawn."""

    candidates: int = 100  # per source, and fused (the gateway's ``rank_candidates``)
    history_window: int = 50  # the gateway's ``history_window``
    fold_in: int = 3
    targets: int = 10
    max_users: int | None = 300  # per cut-off
    #: the gateway's ``retrieval_weights``; None: the union of the sources' lists, not fused
    weights: Mapping[str, float] | None = None
    #: popularity's half-life, the index's (:func:`core.behaviour.popularity_half_life`)
    half_life_days: float = DEFAULT_HALF_LIFE_DAYS


@dataclass(frozen=True)
class Catalogue:
    """Item ids with their unit item vectors (the vectors the gateway's Milvus holds)."""

    item_ids: list[str]
    vectors: np.ndarray
    categories: list[list[str]]
    titles: list[str]
    created_at: np.ndarray  # epoch seconds, 0 when unknown

    @classmethod
    def build(cls, items: pd.DataFrame, item_ids: Sequence[str], vectors: np.ndarray) -> Catalogue:
        frame = items.set_index(items["item_id"].astype(str))
        frame = frame.loc[list(item_ids)]
        return cls(
            list(item_ids),
            np.asarray(vectors, dtype=np.float32),
            [list(c) for c in frame["categories"]],
            [str(t) for t in frame["title"]],
            creation_seconds(items, item_ids),
        )


def creation_seconds(items: pd.DataFrame, item_ids: Sequence[str]) -> np.ndarray:
    """The creation time of each of ``item_ids`` in epoch seconds, 0 when unknown."""
    if "created_at" not in items:
        return np.zeros(len(item_ids), dtype=np.float64)
    created = items.set_index(items["item_id"].astype(str))["created_at"].loc[list(item_ids)]
    ts = pd.to_datetime(created, utc=True)
    return np.where(ts.notna(), ts.astype("int64") // 10**9, 0).astype(np.float64)


#: ``(histories, users) -> [len(users), catalogue items]`` sequence-model scores of each
#: user's events in ``histories`` (see :func:`training.models.sequence.catalogue_scores`)
SequenceScores = Callable[[pd.DataFrame, Sequence[str]], np.ndarray]
#: ``cut -> SequenceScores`` of the sequence model as it would have been served at ``cut``:
#: trained on the events before it only
SequenceAt = Callable[[pd.Timestamp], SequenceScores]


@dataclass(frozen=True)
class IndexState:
    """The catalogue as indexing would have written it from the events before a cut-off:
    what every group replayed at that cut-off reads."""

    index: dict[str, int]  # item id -> catalogue index
    pop: np.ndarray  # time-decayed popularity
    popular_order: np.ndarray  # catalogue indices, most popular first
    neighbours: dict[str, list[str]]  # co-occurrence neighbours, best first
    created: np.ndarray  # creation (else first-seen) time, epoch seconds, 0 unknown
    clock: CatalogueClock
    unborn: set[int]  # created after the cut-off: not in the catalogue yet

    @classmethod
    def at(cls, catalogue: Catalogue, before: pd.DataFrame, half_life_days: float) -> IndexState:
        index = {iid: n for n, iid in enumerate(catalogue.item_ids)}
        popularity = item_popularity(before, half_life_days)
        pop = np.array([popularity.get(i, 0.0) for i in catalogue.item_ids])
        seen_at = first_seen(before)
        created = np.where(
            catalogue.created_at > 0,
            catalogue.created_at,
            [seen_at.get(i, 0.0) for i in catalogue.item_ids],
        )
        # the catalogue's clock is its newest item, as the gateway's (PopularItems.clock)
        latest = before["timestamp"].max().timestamp() if len(before) else 0.0
        present = created <= latest
        known = created[present & (created > 0)]
        now = float(known.max()) if len(known) else latest
        return cls(
            index,
            pop,
            np.lexsort((np.array(catalogue.item_ids), -pop)),
            co_occurrence(before, top=CO_ITEMS),
            created,
            CatalogueClock(top_popularity=float(pop.max(initial=0.0)), now=now),
            {int(i) for i in np.flatnonzero(~present)},
        )


def candidate_groups(
    catalogue: Catalogue,
    before: pd.DataFrame,
    after: pd.DataFrame,
    cfg: CandidateConfig,
    seed: int = 0,
    sequence: SequenceScores | None = None,
    state: IndexState | None = None,
) -> list[dict[str, Any]]:
    """One group per user active in ``after``: ``{"user_id", "features" (c, F), "labels"
    (c,), "targets" (the user's target count, found or not), "items" (c,) catalogue
    indices}``, catalogue state from ``before`` (see the module docstring; ``state``, when
    given, is :meth:`IndexState.at` of it). ``sequence``: the sequence model as the gateway
    serves it (a source, and a feature), trained on events before ``after`` only."""
    state = state or IndexState.at(catalogue, before, cfg.half_life_days)
    users = sorted(after["user_id"].astype(str).unique())
    if cfg.max_users is not None and len(users) > cfg.max_users:
        users = sorted(random.Random(seed).sample(users, cfg.max_users))
    earlier = {str(u): g for u, g in before.groupby("user_id", sort=False)}
    later = {str(u): g for u, g in after.groupby("user_id", sort=False)}
    histories, rests = {}, {}
    for user in users:
        past = earlier.get(user, before.iloc[:0])
        future = later[user].sort_values("timestamp", kind="stable")
        histories[user] = pd.concat([past, future.iloc[: cfg.fold_in]])
        rests[user] = future.iloc[cfg.fold_in :]
    seq_scores = (
        sequence(pd.concat(histories.values()), users) if sequence is not None and users else None
    )
    groups = []
    for u, user in enumerate(users):
        group = _user_group(
            catalogue,
            state,
            histories[user],
            rests[user],
            cfg,
            None if seq_scores is None else seq_scores[u],
        )
        if group is not None:
            groups.append({"user_id": user, **group})
    return groups


def exposure_groups(
    catalogue: Catalogue,
    before: pd.DataFrame,
    events: pd.DataFrame,
    exposures: pd.DataFrame,
    cfg: CandidateConfig,
    seed: int = 0,
    sequence: SequenceScores | None = None,
    state: IndexState | None = None,
) -> list[dict[str, Any]]:
    """One group per logged response in ``exposures`` (``user_id, timestamp, items``, each
    at or after the cut-off that ends ``before``): its shown items (those in the catalogue
    then, not interacted with before), the features as the cut-off's index and the user's
    ``events`` before the response give them, labelled like :func:`candidate_groups`' (among
    the user's next ``cfg.targets`` new positives). Responses whose user liked nothing
    later, or that show nothing left, give no group. At most ``cfg.max_users`` responses,
    drawn with ``seed``; ``sequence`` and ``state``: as there."""
    if cfg.max_users is not None and len(exposures) > cfg.max_users:
        drawn = sorted(random.Random(seed).sample(range(len(exposures)), cfg.max_users))
        exposures = exposures.iloc[drawn]
    if exposures.empty:
        return []
    state = state or IndexState.at(catalogue, before, cfg.half_life_days)
    # group only the responding users' events (this runs at every cut-off)
    responding = events[events["user_id"].astype(str).isin(set(exposures["user_id"].astype(str)))]
    by_user = {
        str(u): g.sort_values("timestamp", kind="stable") for u, g in responding.groupby("user_id")
    }
    responses = []  # (user, history before the response, what followed, shown indices)
    for user, at, items in zip(
        exposures["user_id"].astype(str), exposures["timestamp"], exposures["items"], strict=True
    ):
        mine = by_user.get(user)
        if mine is None:
            continue
        history = mine[mine["timestamp"] < at]
        if (history["weight"] > 0).any():  # a history to replay the sources on
            shown = [state.index[i] for i in map(str, items) if i in state.index]
            responses.append((user, history, mine[mine["timestamp"] >= at], shown))
    seq_scores = None
    if sequence is not None and responses:
        keys = [str(n) for n in range(len(responses))]  # one history per response, not per user
        keyed = [r[1].assign(user_id=k) for r, k in zip(responses, keys, strict=True)]
        seq_scores = sequence(pd.concat(keyed), keys)
    groups = []
    for n, (user, history, rest, shown) in enumerate(responses):
        scores = None if seq_scores is None else seq_scores[n]
        group = _user_group(catalogue, state, history, rest, cfg, scores, shown)
        if group is not None:
            groups.append({"user_id": user, **group})
    return groups


def _user_group(
    catalogue: Catalogue,
    state: IndexState,
    history: pd.DataFrame,
    rest: pd.DataFrame,
    cfg: CandidateConfig,
    seq_scores: np.ndarray | None,
    shown: Sequence[int] | None = None,
) -> dict[str, Any] | None:
    """The group of one user at one point: the fused candidates, or the ``shown`` items
    (catalogue indices, in the order shown) of a logged response."""
    index, pop, neighbours, created = state.index, state.pop, state.neighbours, state.created
    seen = {index[i] for i in history["item_id"].astype(str) if i in index} | state.unborn
    positives = history[history["weight"] > 0].sort_values("timestamp", kind="stable")
    newest_first = dict.fromkeys(reversed(positives["item_id"].astype(str).tolist()))
    recent = [index[i] for i in newest_first if i in index]
    targets = [
        index[i]
        for i in dict.fromkeys(rest.loc[rest["weight"] > 0, "item_id"].astype(str))
        if i in index and index[i] not in seen
    ][: cfg.targets]
    if not recent or not targets:
        return None
    window = recent[: cfg.history_window]
    n = cfg.candidates
    ranks: dict[int, dict[str, int]] = {}
    lists: dict[str, list[str]] = {}

    def add(source: str, found: Sequence[int]) -> None:
        for rank, item in enumerate(found[:n]):
            ranks.setdefault(int(item), {})[source] = rank
        lists[source] = [catalogue.item_ids[i] for i in found[:n]]

    hist = catalogue.vectors[window]
    query = hist.mean(axis=0)
    query /= np.linalg.norm(query) or 1.0
    scores = catalogue.vectors @ query
    top = np.argpartition(-scores, min(n + len(seen), len(scores) - 1))[: n + len(seen)]
    add("ann", [i for i in top[np.argsort(-scores[top], kind="stable")] if i not in seen])
    co, _ = co_occurrence_scores([neighbours.get(catalogue.item_ids[i], []) for i in window])
    co_ids = [index[i] for i in co if i in index and index[i] not in seen]
    co_ids.sort(key=lambda i: -co[catalogue.item_ids[i]])
    add("co_occurrence", co_ids)
    add("popular", [i for i in state.popular_order[: n + len(seen)] if i not in seen])
    if seq_scores is not None:
        top = np.argpartition(-seq_scores, min(n + len(seen), len(seq_scores) - 1))
        top = top[: n + len(seen)]
        add(
            "sequence",
            [i for i in top[np.argsort(-seq_scores[top], kind="stable")] if i not in seen],
        )
    if cfg.weights is None:
        items = sorted(ranks)
    else:
        items = sorted(index[i] for i, _ in fuse_ids(lists, cfg.weights, n))
    kept: list[int] = []
    if shown is not None:  # features among the candidates the ranker scored, rows of the shown
        kept = list(dict.fromkeys(i for i in shown if i not in seen))
        if not kept:
            return None
        items = items + sorted(set(kept) - set(items))  # shown, though this replay missed them
        for i in kept:
            ranks.setdefault(i, {})
    user = UserSide(
        history_vectors=hist,
        interests=interests([(catalogue.titles[i], catalogue.categories[i]) for i in recent[:50]]),
        history_len=len(recent),
    )
    features = feature_matrix(
        user,
        state.clock,
        catalogue.vectors[items],
        [ranks[i] for i in items],
        [co.get(catalogue.item_ids[i], 0.0) for i in items],
        pop[items],
        created[items],
        [catalogue.categories[i] for i in items],
        None if seq_scores is None else seq_scores[items],
    )
    if shown is not None:
        row = {item: r for r, item in enumerate(items)}
        features, items = features[[row[i] for i in kept]], kept
    wanted = set(targets)
    labels = np.array([i in wanted for i in items], dtype=np.float32)
    return {
        "features": features,
        "labels": labels,
        "targets": len(targets),
        "items": np.asarray(items, dtype=np.int64),  # catalogue indices, row by row
    }


def training_cutoffs(train: pd.DataFrame, quantiles: Sequence[float]) -> list[pd.Timestamp]:
    """Cut-offs at event-count quantiles of the training period (not dataset constants)."""
    ts = train["timestamp"].sort_values(kind="stable").reset_index(drop=True)
    return [ts.iloc[min(int(q * len(ts)), len(ts) - 1)] for q in quantiles]


def split_at(events: pd.DataFrame, cut: pd.Timestamp) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Events before ``cut`` and from it on."""
    return events[events["timestamp"] < cut], events[events["timestamp"] >= cut]
