"""The split protocol, the baseline systems and the reference pipeline on small data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.behaviour import DEFAULT_HALF_LIFE_DAYS
from core.fusion import mmr
from tests.training.evaluation.conftest import rating_events
from training.data import load_dataset
from training.data.schema import Dataset
from training.evaluation import systems as S
from training.evaluation.pipeline import (
    Fold,
    HybridPipeline,
    PipelineConfig,
    rank_terms,
    tune,
)
from training.evaluation.protocol import make_split


def _items(ids: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": ids,
            "title": [f"T {i}" for i in ids],
            "categories": [["G"] for _ in ids],
            "text": "",
            "created_at": pd.NaT,
        }
    )


@pytest.fixture()
def toy() -> Dataset:
    # train (t < 100): a popular, then b; a & b co-occur for u1, u2; c only with a for u3
    # test (t >= 100): new user n1 with 5 events, warm user u1 with 2 events
    rows = [
        ("u1", "a", 1, 1.0),
        ("u1", "b", 2, 1.0),
        ("u2", "a", 3, 1.0),
        ("u2", "b", 4, 1.0),
        ("u3", "a", 5, 1.0),
        ("u3", "c", 6, 1.0),
        ("u4", "a", 7, 1.0),
        ("u4", "e", 8, 0.0),  # a negative rating
        ("n1", "a", 100, 1.0),
        ("n1", "e", 101, 0.0),
        ("n1", "b", 102, 1.0),
        ("n1", "c", 103, 1.0),
        ("n1", "new", 104, 1.0),
        ("u1", "c", 105, 1.0),
        ("u1", "new", 106, 1.0),
    ]
    return Dataset(rating_events(rows), _items(["a", "b", "c", "d", "e", "new"]))


def test_split_fold_in_targets_and_slices(toy: Dataset) -> None:
    sp = make_split(toy, cutoff="1970-01-01 00:01:40", fold_in=3)
    # n1: first 3 post-cut-off events revealed (a, e, b); targets c, new
    assert sp.targets["n1"] == {"c", "new"}
    assert sp.known_events["n1"] == 3
    # u1: 2 test events -> only 1 revealed (keep one to predict); known = 2 train + 1
    assert sp.targets["u1"] == {"new"}
    assert sp.known_events["u1"] == 3
    assert set(sp.observed["item_id"][sp.observed["user_id"] == "n1"]) == {"a", "e", "b"}
    assert sp.new_items == {"d", "new"}
    sl = sp.slices(cold_max_events=3)
    assert set(sl["cold_start"]) == {"n1", "u1"}
    assert sl["new_items"] == {"n1": {"new"}, "u1": {"new"}}
    assert max(sp.train.events["timestamp"]) < min(sp.observed["timestamp"])


def test_split_without_fold_in(toy: Dataset) -> None:
    sp = make_split(toy, cutoff="1970-01-01 00:01:40", fold_in=0)
    assert sp.targets["n1"] == {"a", "b", "c", "new"}
    assert sp.known_events["n1"] == 0
    assert sp.observed.empty


def test_popularity_excludes_seen_and_breaks_ties_deterministically(toy: Dataset) -> None:
    sp = make_split(toy, cutoff="1970-01-01 00:01:40", fold_in=3)
    pop = S.Popularity()
    pop.fit(sp.train)
    assert pop.recommend(["nobody"], 3) == {"nobody": ["a", "b", "c"]}
    pop.observe(sp.observed)
    # n1 has seen a, e, b: remaining by popularity c (1 user), then d/new (0) by item order
    assert pop.recommend(["n1"], 3)["n1"] == ["c", "d", "new"]
    assert pop.recommend(["n1"], 2, exclude_seen=False)["n1"] == ["a", "b"]


def test_itemknn_cosine(toy: Dataset) -> None:
    sp = make_split(toy, cutoff="1970-01-01 00:01:40", fold_in=0)
    knn = S.ItemKNN()
    knn.fit(sp.train)
    ia, ib, ic = (knn.index[i] for i in "abc")
    # a liked by u1..u4 (4; u4's e is negative), b by u1,u2: cos = 2 / sqrt(4*2)
    assert knn.sim[ia, ib] == pytest.approx(2 / np.sqrt(8))
    assert knn.sim[ia, ic] == pytest.approx(1 / np.sqrt(4))
    assert knn.sim[ib, ic] == 0.0
    knn.observe(rating_events([("x", "b", 200, 1.0)]))
    # history {b}: a is its only neighbour
    assert knn.recommend(["x"], 1)["x"] == ["a"]


@pytest.mark.parametrize("cls", [S.ALS, S.BPR])
def test_matrix_factorisation_runs_and_folds_in(toy: Dataset, cls: type) -> None:
    sp = make_split(toy, cutoff="1970-01-01 00:01:40", fold_in=3)
    model = cls(factors=4, iterations=5, seed=0, threads=1)
    model.fit(sp.train)
    model.observe(sp.observed)
    recs = model.recommend(sp.users, 3)
    assert set(recs) == set(sp.users)
    assert not {"a", "e", "b"} & set(recs["n1"])  # n1's fold-in items are excluded
    assert all(len(v) == 3 for v in recs.values())


def test_trending_popularity_prefers_recent(toy: Dataset) -> None:
    rows = [("u1", "old", 0, 1.0), ("u2", "old", 1, 1.0), ("u3", "fresh", 400 * 86400, 1.0)]
    ds = Dataset(rating_events(rows), _items(["old", "fresh"]))
    trending = S.TrendingPopularity(half_life_days=30)
    trending.fit(ds)
    assert trending.recommend(["x"], 2)["x"] == ["fresh", "old"]
    pop = S.Popularity()
    pop.fit(ds)
    assert pop.recommend(["x"], 2)["x"] == ["old", "fresh"]
    chosen = S.TrendingPopularity()  # three events: too few to choose on, the default
    chosen.fit(ds)
    assert chosen.chosen_days == DEFAULT_HALF_LIFE_DAYS


def test_callable_recommender_wraps_a_callable(toy: Dataset) -> None:
    seen: list[str] = []
    hook = S.CallableRecommender(
        lambda u, k: ["a", "b", "c"][:k], name="served", fit_fn=lambda d: None
    )
    hook.fit(toy)
    hook.observe(toy.events.iloc[:0])
    assert hook.recommend(["u1", "u2"], 2) == {"u1": ["a", "b"], "u2": ["a", "b"]}
    assert isinstance(hook, S.Recommender)
    assert not seen


def test_rank_terms_and_mmr() -> None:
    s = np.array([[0.1, 0.9, -np.inf, 0.5]])
    t = rank_terms(s, rrf_k=0.0)
    assert t[0].tolist() == pytest.approx([1 / 3, 1.0, 0.0, 1 / 2])
    vecs = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    items = np.array([0, 1, 2])
    rel = np.array([1.0, 0.9, 0.5])
    assert items[mmr(rel, vecs[items], 2, 0.0)].tolist() == [0, 1]  # pure relevance
    assert items[mmr(rel, vecs[items], 2, 0.7)].tolist() == [0, 2]  # 1 duplicates 0: skipped


def test_reference_pipeline_tunes_and_recommends(generic_dir: Path) -> None:
    ds = load_dataset(generic_dir)
    sp = make_split(ds)

    def sources() -> dict[str, S.CatalogueRecommender]:
        return {"popularity": S.Popularity(), "itemknn": S.ItemKNN()}

    val = make_split(Dataset(sp.train.events, ds.items), quantile=0.8)
    vp = HybridPipeline(sources(), PipelineConfig(weights={}))
    vp.fit(val.train)
    vp.observe(val.observed)
    result = tune([Fold(vp, val.users, val.targets)])
    assert set(result["config"]["weights"]) == {"popularity", "itemknn"}
    assert result["config"]["mmr_lambda"] == 0.0  # no vectors: MMR off
    pipe = HybridPipeline(sources(), PipelineConfig(**result["config"]))
    pipe.fit(sp.train)
    pipe.observe(sp.observed)
    recs = pipe.recommend(sp.users, 5)
    for u, items in recs.items():
        assert len(items) == 5
        assert not set(items) & pipe.seen.get(u, set())
    # a single source with weight 1 reproduces that source's ranking
    only = HybridPipeline(sources(), PipelineConfig(weights={"itemknn": 1.0}))
    only.fit(sp.train)
    only.observe(sp.observed)
    knn = only.sources["itemknn"]
    assert only.recommend(sp.users, 5) == knn.recommend(sp.users, 5)


def test_split_max_users_is_a_seeded_sample(generic_dir: Path) -> None:
    ds = load_dataset(generic_dir)
    full = make_split(ds)
    a = make_split(ds, max_users=5, seed=3)
    b = make_split(ds, max_users=5, seed=3)
    assert len(a.users) == 5 and a.users == b.users
    assert set(a.users) <= set(full.users)
    assert set(a.observed["user_id"]) <= set(a.users)
