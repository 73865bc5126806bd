from __future__ import annotations

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.data import Dataset
from training.data.split import time_split


def _events(rows: list[tuple[int, int]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": [f"u{u}" for u, _ in rows],
            "item_id": [f"i{k}" for k in range(len(rows))],
            "timestamp": pd.to_datetime([t for _, t in rows], unit="s", utc=True),
            "weight": 1.0,
        }
    )


rows_strategy = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 50)), min_size=1, max_size=60)


@settings(max_examples=60, deadline=None)
@given(rows=rows_strategy, q=st.floats(0.05, 0.95))
def test_global_cutoff_never_leaks(rows: list[tuple[int, int]], q: float) -> None:
    ev = _events(rows)
    train, test = time_split(ev, quantile=q)
    assert len(train) + len(test) == len(ev)
    if len(train) and len(test):
        assert train["timestamp"].max() < test["timestamp"].min()


@settings(max_examples=60, deadline=None)
@given(rows=rows_strategy, n=st.integers(1, 3))
def test_leave_last_n_never_leaks_per_user(rows: list[tuple[int, int]], n: int) -> None:
    ev = _events(rows)
    train, test = time_split(ev, leave_last_n=n)
    assert len(train) + len(test) == len(ev)
    assert set(train["item_id"]) | set(test["item_id"]) == set(ev["item_id"])
    for uid, t in test.groupby("user_id"):
        assert len(t) == n
        tr = train[train["user_id"] == uid]
        assert len(tr) >= 1  # users with <= n events stay in train
        assert tr["timestamp"].max() <= t["timestamp"].min()


def test_cutoff_and_naive_timestamp() -> None:
    ev = _events([(0, 10), (0, 20), (1, 30)])
    train, test = time_split(ev, cutoff="1970-01-01 00:00:20")
    assert train["item_id"].tolist() == ["i0"]
    assert test["item_id"].tolist() == ["i1", "i2"]
    with pytest.raises(ValueError):
        time_split(ev, quantile=None)
    with pytest.raises(ValueError):
        time_split(ev, quantile=1.5)


def test_movielens_split_no_future_in_train(movielens: Dataset) -> None:
    ds = movielens
    train, test = time_split(ds.events, quantile=0.8)
    assert train["timestamp"].max() < test["timestamp"].min()
    assert abs(len(train) / len(ds.events) - 0.8) < 0.01
    tr, te = time_split(ds.events, leave_last_n=1)
    last = te.set_index("user_id")["timestamp"]
    first_train_max = tr.groupby("user_id")["timestamp"].max()
    assert (first_train_max.loc[last.index] <= last).all()
