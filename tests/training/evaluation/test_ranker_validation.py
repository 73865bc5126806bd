"""The feature ranker replayed on a validation window of the training period, on the small
synthetic dataset (users prefer one genre)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from core.fusion import fuse_ids
from core.ranking_features import (
    FEATURES,
    RANKED_SOURCES,
    CatalogueClock,
    UserSide,
    feature_matrix,
)
from tests.training.evaluation.conftest import synthetic_generic
from tests.training.evaluation.test_sequence_system import FakeEncoder
from training.config import FeatureRankerConfig, SequenceConfig
from training.data import Dataset, load_dataset
from training.data.candidates import Catalogue, SequenceScores, training_cutoffs
from training.evaluation.ranker_validation import (
    catalogue_for,
    fused,
    is_cold,
    validate_window,
    window_groups,
)
from training.steps import fit_in_process
from training.tasks.feature_ranker import (
    FeatureRankerTask,
    feature_scaling,
    group_ndcg,
    retrieval_order,
)

CFG = FeatureRankerConfig(epochs=8, batch_size=4, cutoffs=[0.5, 0.7, 0.9], users_per_cutoff=None)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Dataset, Catalogue]:
    ds = load_dataset(synthetic_generic(tmp_path_factory.mktemp("generic"), users=200))
    return ds, catalogue_for(ds, FakeEncoder())


def test_nothing_after_the_validation_point_reaches_the_training_groups(
    data: tuple[Dataset, Catalogue],
) -> None:
    ds, catalogue = data
    events = ds.events
    groups, held_out = window_groups(catalogue, events, CFG, 0.8)
    (point,) = training_cutoffs(events, [0.8])
    # the validation period rewritten: other items, other users, other weights
    later = events["timestamp"] >= point
    changed = events.copy()
    changed.loc[later, "item_id"] = np.roll(changed.loc[later, "item_id"].to_numpy(), 7)
    changed.loc[later, "weight"] = -changed.loc[later, "weight"]
    again, _ = window_groups(catalogue, changed, CFG, 0.8)
    assert groups and held_out
    assert [g["user_id"] for g in again] == [g["user_id"] for g in groups]
    for a, b in zip(again, groups, strict=True):
        np.testing.assert_array_equal(a["features"], b["features"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
    # and the validation users are those active after the point
    active = set(events.loc[later, "user_id"].astype(str))
    assert {g["user_id"] for g in held_out} <= active


def test_the_ranker_learns_what_popularity_cannot_see(data: tuple[Dataset, Catalogue]) -> None:
    ds, catalogue = data
    out = validate_window(catalogue, ds.events, CFG, 0.8, seeds=(0, 1))
    assert out["training_users"] > 0 and out["validation_users"]["all"] > 0
    assert 0 < out["candidate_recall"] <= 1
    # here each user likes one genre: category affinity separates clicks from the rest
    assert all(r["auc"] > 0.65 for r in out["runs"])
    assert np.mean([r["ranker"]["all"] for r in out["runs"]]) > out["popularity"]["all"]
    users = out["validation_users"]
    assert (
        users["cold"] + users["warm"]
        == users["all"]
        == len(window_groups(catalogue, ds.events, CFG, 0.8)[1])
    )
    for scores in [out["popularity"], out["retrieval"], *[r["ranker"] for r in out["runs"]]]:
        assert set(scores) == {"all", "cold", "warm"}
        # the whole is the cohorts' user-weighted mean
        parts = [scores[c] * users[c] for c in ("cold", "warm") if users[c]]
        assert scores["all"] == pytest.approx(sum(parts) / users["all"])


def test_the_retrieval_order_is_the_gateways_fusion_read_back_from_the_features() -> None:
    """Scoring candidates from their reciprocal-rank features gives the scores of
    :func:`core.fusion.fuse_ids` (the gateway's and the replay's fusion) over the sources'
    original lists, ranks far down a list included."""
    rng = np.random.default_rng(0)
    items = [f"i{n}" for n in range(300)]
    lists = {s: list(rng.permutation(items)[:150]) for s in RANKED_SOURCES}
    weights = {"ann": 2.0, "co_occurrence": 0.5, "popular": 4.0, "sequence": 1.5}
    fused_ids = fuse_ids(lists, weights, 100)
    ranks = [{s: lst.index(i) for s, lst in lists.items() if i in lst} for i, _ in fused_ids]
    n = len(ranks)
    features = feature_matrix(
        UserSide(np.zeros((0, 4), dtype=np.float32), {}, 5),
        CatalogueClock(1.0, 0.0),
        np.zeros((n, 4), dtype=np.float32),
        ranks,
        np.zeros(n),
        np.zeros(n),
        np.zeros(n),
        [[] for _ in range(n)],
    )
    (scores,) = retrieval_order([{"features": features}], {**weights, "segment": 3.0})
    np.testing.assert_allclose(scores, [score for _, score in fused_ids], rtol=1e-6)


def test_the_replayed_exploration_slot_takes_the_newest_of_the_best_content_matches() -> None:
    """``group_ndcg(exploration=...)`` fills the slot as the gateway does: the newest of
    ``exploration_pool`` new items by ANN rank, not the best content match alone."""
    n = 12
    features = np.zeros((n, len(FEATURES)), dtype=np.float32)
    col = {name: FEATURES.index(name) for name in FEATURES}
    features[:10, col["popularity"]] = 0.5  # established items, the ranker's top 10
    features[10:, col["age_known"]] = 1.0
    features[10, col["ann_rr"]], features[10, col["age"]] = 1 / 2, np.log1p(60) / 10
    features[11, col["ann_rr"]], features[11, col["age"]] = 1 / 6, np.log1p(2) / 10
    labels = np.zeros(n, dtype=np.float32)
    labels[11] = 1.0  # the newer of the two new items, the worse content match
    group = {"features": features, "labels": labels, "targets": 1}
    scores = np.arange(n, 0, -1, dtype=np.float32)
    assert group_ndcg([group], [scores]) == 0.0
    assert group_ndcg([group], [scores], exploration=0.1) == pytest.approx(1 / np.log2(11))


def test_cold_users_are_those_with_at_most_the_fold_in_known() -> None:
    column = FEATURES.index("history_len")
    row = np.zeros((1, len(FEATURES)), dtype=np.float32)
    for positives, cold in [(1, True), (3, True), (4, False), (40, False)]:
        row[0, column] = np.log1p(positives) / 10
        assert is_cold({"features": row}, fold_in=3) is cold


def test_the_sequence_model_is_replayed_as_served_without_seeing_the_validation_period(
    data: tuple[Dataset, Catalogue],
) -> None:
    """With ``sequence`` on, both group sets carry the sequence model's features (it is a
    source and a feature, as served), from models trained on events before the cut-offs
    (training groups) and before the validation point (validation groups) only."""
    ds, catalogue = data
    seq = SequenceConfig(epochs=1, dim=16, blocks=1, max_seq_len=20, time_periods=8)
    groups, held_out = window_groups(catalogue, ds.events, CFG, 0.8, sequence=seq)
    column = FEATURES.index("sequence_rr")  # 0 for a candidate the model did not return
    assert all(g["features"][:, column].any() for g in groups + held_out)
    off = dataclasses.replace(CFG, sequence=False)
    without, _ = window_groups(catalogue, ds.events, off, 0.8, sequence=seq)
    assert not any(g["features"][:, column].any() for g in without)
    (point,) = training_cutoffs(ds.events, [0.8])
    changed = ds.events.copy()
    later = changed["timestamp"] >= point
    changed.loc[later, "item_id"] = np.roll(changed.loc[later, "item_id"].to_numpy(), 7)
    again, _ = window_groups(catalogue, changed, CFG, 0.8, sequence=seq)
    for a, b in zip(again, groups, strict=True):
        np.testing.assert_array_equal(a["features"], b["features"])


def test_each_cut_off_gets_a_sequence_twin_trained_on_the_events_before_it(
    data: tuple[Dataset, Catalogue], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As current as the served model is when it serves: one twin per cut-off, trained on
    the events before that cut-off only (a single twin from before the first cut-off left
    the later cut-offs' sequence features stale); the validation groups get one trained on
    everything before the validation point."""
    import training.evaluation.ranker_validation as rv

    ds, catalogue = data
    trained_until: list[pd.Timestamp] = []
    real = rv.sequence_scores

    def recording(cfg: SequenceConfig, cat: Catalogue, events: pd.DataFrame) -> SequenceScores:
        trained_until.append(events["timestamp"].max())
        return real(cfg, cat, events)

    monkeypatch.setattr(rv, "sequence_scores", recording)
    seq = SequenceConfig(epochs=1, dim=16, blocks=1, max_seq_len=20, time_periods=8)
    window_groups(catalogue, ds.events, CFG, 0.8, sequence=seq)
    (point,) = training_cutoffs(ds.events, [0.8])
    inner = ds.events[ds.events["timestamp"] < point]
    cuts = training_cutoffs(inner, CFG.cutoffs)
    served, *twins = trained_until
    assert served == inner["timestamp"].max()
    assert len(twins) == len(cuts)
    for until, cut in zip(twins, cuts, strict=True):
        assert until == inner.loc[inner["timestamp"] < cut, "timestamp"].max()


def test_validation_groups_are_the_served_candidates_whatever_the_training_replay(
    data: tuple[Dataset, Catalogue],
) -> None:
    """Validation groups are the gateway's fused top ``candidates`` (what is served); the
    training groups are too, or with ``fused`` off the union of the sources' lists."""
    ds, catalogue = data
    small = dataclasses.replace(CFG, candidates=10)
    union = dataclasses.replace(small, fused=False)
    groups, held_out = window_groups(catalogue, ds.events, small, 0.8)
    wide, held_out_too = window_groups(catalogue, ds.events, union, 0.8)
    assert all(len(g["items"]) <= 10 for g in groups + held_out)
    assert max(len(g["items"]) for g in wide) > 10
    for a, b in zip(held_out, held_out_too, strict=True):
        np.testing.assert_array_equal(a["items"], b["items"])


def test_training_in_process_is_reproducible_per_seed(data: tuple[Dataset, Catalogue]) -> None:
    ds, catalogue = data
    groups, _ = window_groups(catalogue, ds.events, dataclasses.replace(CFG, epochs=1), 0.8)
    mean, std = feature_scaling(groups)

    def weights(seed: int) -> list[torch.Tensor]:
        task = FeatureRankerTask(dataclasses.replace(CFG, epochs=1), mean, std)
        return list(fit_in_process(task, groups, seed).state_dict().values())

    first, second, other = weights(0), weights(0), weights(1)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_fusion_counts_both_orders() -> None:
    a = np.array([3.0, 2.0, 1.0, 0.0])
    b = np.array([0.0, 1.0, 2.0, 3.0])
    both = fused(a, b)
    assert np.allclose(both, both[::-1])  # mirror images: symmetric ranks
    assert fused(a, a).argmax() == 0 and list(np.argsort(-fused(a, a))) == [0, 1, 2, 3]
    # second in one order and first in the other beats first and last
    assert fused(a, np.array([0.0, 9.0, 1.0, 2.0])).argmax() == 1


def test_evaluation_leaves_the_model_in_the_mode_it_found(data: tuple[Dataset, Catalogue]) -> None:
    """``validate_window`` scores the model after the task evaluated it: the evaluation must
    not switch dropout back on for a model that was trained and put in eval mode."""
    ds, catalogue = data
    small = dataclasses.replace(CFG, epochs=1, dropout=0.5)
    groups, held_out = window_groups(catalogue, ds.events, small, 0.8)
    task = FeatureRankerTask(small, *feature_scaling(groups))
    model = fit_in_process(task, groups, 0)
    assert not model.training
    features = torch.from_numpy(held_out[0]["features"])
    with torch.no_grad():
        before = model(features)
        task.evaluate(model, None, held_out, torch.device("cpu"))
        assert not model.training
        assert torch.equal(model(features), before)
    model.train()
    task.evaluate(model, None, held_out, torch.device("cpu"))
    assert model.training
