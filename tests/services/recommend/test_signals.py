"""The behaviour signals the retrieval sources read from Milvus: decayed popularity
(``popular``), interests, item co-occurrence (``co_occurrence``), user segments
(``segment``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.behaviour import co_occurrence, interests, item_popularity
from ops.segments import spherical_kmeans


def test_popularity_decays_with_age_and_counts_users_once() -> None:
    day = pd.Timedelta(days=1)
    t0 = pd.Timestamp("2020-01-01", tz="UTC")
    events = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u2", "u3", "u4"],
            "item_id": ["old", "old", "old", "new", "neg"],
            "timestamp": [t0, t0 + day, t0, t0 + 365 * day, t0 + 365 * day],
            "weight": [1.0, 1.0, 1.0, 1.0, 0.0],
        }
    )
    decayed = item_popularity(events, half_life_days=365.0)
    assert decayed["new"] == pytest.approx(1.0)  # one user, at the newest time
    # two users a year (u2) and 364 days (u1's latest) before the newest event
    assert decayed["old"] == pytest.approx(0.5 + 0.5 ** (364 / 365))
    assert "neg" not in decayed
    assert item_popularity(events, half_life_days=None) == {"old": 2.0, "new": 1.0}


def test_interests_decay_with_recency() -> None:
    got = interests([("new", ["Drama"]), ("old", ["Comedy"])])
    assert got["Drama"] > got["Comedy"]
    assert abs(sum(got.values()) - 1) < 1e-3
    assert interests([]) == {}


def test_co_occurrence_is_cosine_over_users() -> None:
    events = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u2", "u2", "u3", "u3", "u3"],
            "item_id": ["a", "b", "a", "b", "a", "c", "b"],
            "weight": [1.0] * 7,
        }
    )
    co = co_occurrence(events, top=5, min_support=2)
    assert co["a"] == ["b"]  # a-c seen together once: below support
    assert co["b"] == ["a"]
    assert "c" not in co


def test_spherical_kmeans_separates_clusters() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal([5, 0, 0], 0.1, (20, 3))
    b = rng.normal([0, 5, 0], 0.1, (20, 3))
    x = np.vstack([a, b]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    centroids, labels = spherical_kmeans(x, 2, seed=1)
    assert len(set(labels[:20])) == 1 and len(set(labels[20:])) == 1
    assert labels[0] != labels[-1]
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-5)
