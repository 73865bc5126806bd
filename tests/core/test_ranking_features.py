"""The feature ranker's rows: co-occurrence scores and the values without a history."""

from __future__ import annotations

import numpy as np
import pytest

from core.ranking_features import (
    CO_SEEDS,
    FEATURES,
    CatalogueClock,
    UserSide,
    co_occurrence_scores,
    feature_matrix,
)


def test_co_occurrence_scores_decay_with_seed_recency_and_neighbour_rank() -> None:
    scores, seed = co_occurrence_scores([["a", "b"], ["b", "c"]])
    assert scores == pytest.approx({"a": 1.0, "b": 0.5 + 0.9, "c": 0.45})
    assert seed == {"a": 0, "b": 1, "c": 1}  # b's best single gain is the second seed's 0.9
    many = [["x"]] * (CO_SEEDS + 5)
    assert co_occurrence_scores(many)[0]["x"] == pytest.approx(sum(0.9**i for i in range(10)))


def test_rows_without_history_or_creation_time_are_zero_there_not_nan() -> None:
    user = UserSide(np.zeros((0, 4), np.float32), {}, 0)
    clock = CatalogueClock(top_popularity=0.0, now=0.0)
    rows = feature_matrix(
        user, clock, np.ones((2, 4), np.float32), [{}, {"popular": 0}], [0, 0], [0, 0], [0, 0],
        [[], ["A"]],
    )  # fmt: skip
    assert rows.shape == (2, len(FEATURES)) and np.isfinite(rows).all()
    assert rows[:, FEATURES.index("cos_mean")].tolist() == [0.0, 0.0]
    assert rows[:, FEATURES.index("age_known")].tolist() == [0.0, 0.0]
    assert rows[1, FEATURES.index("popular_rr")] == 1.0
    empty = feature_matrix(user, clock, np.zeros((0, 4)), [], [], [], [], [])
    assert empty.shape == (0, len(FEATURES))
