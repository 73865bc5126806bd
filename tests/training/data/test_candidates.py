"""The feature ranker's training data replays the gateway's candidates: no seen item, labels
from the next positives, and feature rows equal to what the gateway builds for the same user."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.behaviour import co_occurrence, first_seen, interests, item_popularity
from core.milvus_schema import CO_ITEMS
from core.ranking_features import FEATURES, CatalogueClock
from services.deadline import Deadline
from services.recommend.context import Candidate, Context, Filters
from services.recommend.rank import candidate_features
from services.recommend.retrieve import Retriever
from training.data.candidates import (
    CandidateConfig,
    Catalogue,
    candidate_groups,
    split_at,
    training_cutoffs,
)

N_ITEMS, N_USERS, DIM = 40, 30, 8


@pytest.fixture(scope="module")
def world() -> tuple[pd.DataFrame, Catalogue]:
    rng = np.random.default_rng(0)
    items = pd.DataFrame(
        {
            "item_id": [f"i{n}" for n in range(N_ITEMS)],
            "title": [f"Item {n}" for n in range(N_ITEMS)],
            "categories": [["A"] if n % 3 else ["B", "C"] for n in range(N_ITEMS)],
            "created_at": [pd.NaT] * N_ITEMS,
        }
    )
    rows = []
    for u in range(N_USERS):
        start = pd.Timestamp("2020-01-01", tz="UTC") + pd.Timedelta(days=int(rng.integers(60)))
        for e in range(12):
            rows.append(
                {
                    "user_id": f"u{u}",
                    "item_id": f"i{int(rng.zipf(1.5)) % N_ITEMS}",
                    "timestamp": start + pd.Timedelta(days=3 * e, seconds=u),
                    "weight": 1.0 if rng.random() < 0.8 else -1.0,
                    "event_type": "rating",
                }
            )
    events = pd.DataFrame(rows)
    vectors = rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return events, Catalogue.build(items, list(items["item_id"]), vectors)


WEIGHTS = {"ann": 2.0, "co_occurrence": 0.5, "popular": 4.0}


def _groups(
    world: tuple[pd.DataFrame, Catalogue], weights: dict[str, float] | None = None
) -> tuple[list[dict], pd.DataFrame, pd.DataFrame]:
    events, catalogue = world
    (cut,) = training_cutoffs(events, [0.6])
    before, after = split_at(events, cut)
    cfg = CandidateConfig(
        candidates=10, history_window=5, fold_in=2, targets=3, max_users=None, weights=weights
    )
    return candidate_groups(catalogue, before, after, cfg), before, after


def test_candidates_exclude_the_history_and_label_the_next_new_positives(
    world: tuple[pd.DataFrame, Catalogue],
) -> None:
    groups, before, after = _groups(world)
    _, catalogue = world
    assert groups, "the fixture must give some users a target"
    for g in groups:
        user = g["user_id"]
        future = after[after["user_id"] == user].sort_values("timestamp", kind="stable")
        history = pd.concat([before[before["user_id"] == user], future.iloc[:2]])
        touched = set(history["item_id"])
        ids = [catalogue.item_ids[i] for i in g["items"]]
        assert not touched & set(ids)
        rest = future.iloc[2:]
        wanted = [i for i in dict.fromkeys(rest.loc[rest["weight"] > 0, "item_id"])]
        wanted = [i for i in wanted if i not in touched][:3]
        assert g["targets"] == len(wanted)
        assert {i for i, y in zip(ids, g["labels"], strict=True) if y} == set(wanted) & set(ids)
        assert g["features"].shape == (len(ids), len(FEATURES))


@pytest.mark.parametrize("weights", [None, WEIGHTS], ids=["union", "fused"])
def test_rows_equal_what_the_gateway_builds_for_the_same_user(
    world: tuple[pd.DataFrame, Catalogue], weights: dict[str, float] | None
) -> None:
    """Training/serving skew: rebuild each user's candidates as the gateway sees them
    (Milvus rows as indexing writes them, the profile as ingestion keeps it)."""
    groups, before, after = _groups(world, weights)
    _, catalogue = world
    popularity = item_popularity(before)
    neighbours = co_occurrence(before, top=CO_ITEMS)
    created = first_seen(before)
    rows = {
        iid: {
            "item_id": iid,
            "title": catalogue.titles[n],
            "categories": catalogue.categories[n],
            "vector": catalogue.vectors[n].tolist(),
            "popularity": popularity.get(iid, 0.0),
            "created_at": int(created.get(iid, 0)),
            "co_items": neighbours.get(iid, []),
        }
        for n, iid in enumerate(catalogue.item_ids)
    }
    clock = CatalogueClock(
        max(popularity.values()), float(max(rows[i]["created_at"] for i in rows))
    )
    checked = 0
    for g in groups:
        user = g["user_id"]
        future = after[after["user_id"] == user].sort_values("timestamp", kind="stable")
        history = pd.concat([before[before["user_id"] == user], future.iloc[:2]])
        pos = history[history["weight"] > 0].sort_values("timestamp", kind="stable")
        recent = list(dict.fromkeys(reversed(pos["item_id"].tolist())))
        ctx = Context.begin(user, 10, Filters(), Deadline.after(5))
        ctx.history_ids = recent
        ctx.history = [rows[i] for i in recent[:5]]
        ctx.profile = {
            "interests": interests([(rows[i]["title"], rows[i]["categories"]) for i in recent[:50]])
        }
        ids = [catalogue.item_ids[i] for i in g["items"]]
        rank_cols = [FEATURES.index(f) for f in ("ann_rr", "co_occurrence_rr", "popular_rr")]
        ctx.candidates = []
        for iid, f in zip(ids, g["features"], strict=True):
            cand = Candidate(iid, rows[iid])
            for source, col in zip(("ann", "co_occurrence", "popular"), rank_cols, strict=True):
                if f[col] > 0:
                    cand.ranks[source] = round(1 / f[col]) - 1
            ctx.candidates.append(cand)
        served = candidate_features(ctx, clock)
        np.testing.assert_allclose(served, g["features"], rtol=1e-5, atol=1e-4)
        checked += 1
    assert checked == len(groups) > 0


def test_the_replay_keeps_the_candidates_the_gateway_s_fusion_keeps(
    world: tuple[pd.DataFrame, Catalogue],
) -> None:
    """Each source's list as the union replay ranks it, fused by the gateway's own
    ``Retriever.fuse``, gives exactly the fused replay's candidates: the ranker trains on
    what it is served (the union, some 2-3x as many, is what it saw before)."""
    union, _, _ = _groups(world)
    fused, _, _ = _groups(world, WEIGHTS)
    _, catalogue = world
    assert [g["user_id"] for g in union] == [g["user_id"] for g in fused]
    cols = {s: FEATURES.index(f"{s}_rr") for s in WEIGHTS}
    grew = 0
    for u, f in zip(union, fused, strict=True):
        lists: dict[str, list[tuple[int, dict]]] = {s: [] for s in WEIGHTS}
        for item, row in zip(u["items"], u["features"], strict=True):
            for source, col in cols.items():
                if row[col] > 0:
                    rank = round(1 / row[col]) - 1
                    lists[source].append((rank, {"item_id": catalogue.item_ids[item]}))
        ordered = {
            s: [r for _, r in sorted(entries, key=lambda e: e[0])] for s, entries in lists.items()
        }
        served = Retriever.fuse(ordered, WEIGHTS, 10)
        assert sorted(c.item_id for c in served) == sorted(
            catalogue.item_ids[i] for i in f["items"]
        )
        assert len(f["items"]) <= 10 and set(f["items"]) <= set(u["items"])
        grew += len(u["items"]) > len(f["items"])
        assert f["targets"] == u["targets"]
    assert grew > 0
