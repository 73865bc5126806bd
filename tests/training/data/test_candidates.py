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
    exposure_groups,
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


def test_a_logged_response_is_a_group_of_its_shown_items_labelled_by_what_followed(
    world: tuple[pd.DataFrame, Catalogue],
) -> None:
    """The shown items in the order shown, less what the user had touched before and what
    the catalogue does not hold; a shown item among the next new positives is a positive,
    the others (shown, not liked) are the negatives; each row the one the replay builds at
    the same point for the same user among the candidates the ranker scored (the sequence
    model's log-probability is among all of them, not among the few shown)."""
    events, catalogue = world
    (cut,) = training_cutoffs(events, [0.6])
    before, after = split_at(events, cut)
    cfg = CandidateConfig(candidates=10, history_window=5, fold_in=0, targets=3, max_users=None)
    replayed = candidate_groups(catalogue, before, after, cfg)
    group = next(g for g in replayed if 0 < g["labels"].sum() < len(g["labels"]))
    user = group["user_id"]
    ids = [catalogue.item_ids[i] for i in group["items"]]
    liked = next(i for i, y in zip(ids, group["labels"], strict=True) if y)
    unliked = next(i for i, y in zip(ids, group["labels"], strict=True) if not y)
    old = before.loc[before["user_id"] == user, "item_id"].iloc[0]
    shown = [unliked, old, "not-in-the-catalogue", liked]
    exposures = pd.DataFrame({"user_id": [user], "timestamp": [cut], "items": [shown]})

    (logged,) = exposure_groups(catalogue, before, events, exposures, cfg)
    assert [catalogue.item_ids[i] for i in logged["items"]] == [unliked, liked]
    assert logged["labels"].tolist() == [0.0, 1.0]
    assert logged["targets"] == group["targets"]
    rows = [ids.index(unliked), ids.index(liked)]
    np.testing.assert_allclose(logged["features"], group["features"][rows], rtol=1e-6)


def test_responses_without_a_history_or_a_later_positive_give_no_group(
    world: tuple[pd.DataFrame, Catalogue],
) -> None:
    events, catalogue = world
    cfg = CandidateConfig(candidates=10, history_window=5, fold_in=0, targets=3, max_users=None)
    first = events["timestamp"].min()
    last = events["timestamp"].max() + pd.Timedelta(days=1)
    user = str(events["user_id"].iloc[0])
    exposures = pd.DataFrame(
        {
            "user_id": [user, user, "nobody"],
            "timestamp": [first, last, last],  # nothing before / nothing after / no events
            "items": [["i1", "i2"]] * 3,
        }
    )
    assert exposure_groups(catalogue, events, events, exposures, cfg) == []


def test_the_ranker_s_data_adds_logged_responses_after_the_first_cut_off(
    world: tuple[pd.DataFrame, Catalogue], capsys: pytest.CaptureFixture[str]
) -> None:
    """Each response joins the training groups with the index of the latest cut-off before
    it; one before the first cut-off (whose index would come from its future) adds none, nor
    one after the training events (nothing follows it to label with), which does not take
    one of the cut-off's draws either."""
    from training.config import FeatureRankerConfig
    from training.tasks.feature_ranker import replayed_groups

    events, catalogue = world
    train, later = split_at(events, training_cutoffs(events, [0.9])[0])
    cfg = FeatureRankerConfig(cutoffs=[0.5, 0.7], candidates=10, users_per_cutoff=1)
    cuts = training_cutoffs(train, cfg.cutoffs)
    plain, _ = replayed_groups(catalogue, train, later, cfg, cuts, half_life_days=30.0)
    early = cuts[0] - pd.Timedelta(seconds=1)
    liked = train[train["weight"] > 0]
    before_it = set(liked.loc[liked["timestamp"] < early, "user_id"])
    # a user who would give a group at either point: liked something before and after both
    later_likes = liked[(liked["timestamp"] > cuts[-1]) & liked["user_id"].isin(before_it)]
    user, at = later_likes.iloc[0][["user_id", "timestamp"]]
    items = list(catalogue.item_ids)
    exposures = pd.DataFrame(
        {
            "user_id": [user, user, user],
            "timestamp": [early, at, train["timestamp"].max() + pd.Timedelta(days=1)],
            "items": [items] * 3,  # shown everything: whatever they liked next is in it
        }
    )
    capsys.readouterr()
    logged, _ = replayed_groups(
        catalogue, train, later, cfg, cuts, half_life_days=30.0, exposures=exposures
    )
    assert len(logged) == len(plain) + 1
    replayed = {(g["user_id"], tuple(g["items"])) for g in plain}
    extra = [g for g in logged if (g["user_id"], tuple(g["items"])) not in replayed]
    assert [g["user_id"] for g in extra] == [user] and extra[0]["labels"].sum() > 0
    printed = capsys.readouterr().out
    assert f"0 of 0 logged responses after {cuts[0]}" in printed
    assert f"1 of 1 logged responses after {cuts[1]}" in printed
