"""Time-based train/test splits that never let a future event into training.

* global cut-off (``cutoff`` or the ``quantile`` of all timestamps): train = events strictly
  before the cut-off, test = events at or after it, so every train timestamp is earlier than
  every test timestamp;
* ``leave_last_n``: per user, the ``n`` most recent events go to test and the rest to
  train, so within each user every train timestamp is <= every test timestamp (ties broken by
  input order). Users with ``<= n`` events stay entirely in train. Note that across users a
  leave-last-n split *does* mix times (user A's test may precede user B's train), which is the
  standard protocol; use the global cut-off when that matters.
"""

from __future__ import annotations

import pandas as pd


def _as_utc(ts: pd.Timestamp | str) -> pd.Timestamp:
    t = pd.Timestamp(ts)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


def time_split(
    events: pd.DataFrame,
    *,
    cutoff: pd.Timestamp | str | None = None,
    quantile: float | None = 0.8,
    leave_last_n: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split ``events`` into ``(train, test)`` by time (see module docstring).

    Precedence: ``leave_last_n`` if given, else ``cutoff`` if given, else ``quantile``.
    Both frames keep the input columns and are sorted by timestamp.
    """
    if events.empty:
        return events.copy(), events.copy()
    if leave_last_n is not None:
        if leave_last_n < 1:
            raise ValueError("leave_last_n must be >= 1")
        df = events.reset_index(drop=True)
        order = df.assign(_pos=range(len(df))).sort_values(
            ["user_id", "timestamp", "_pos"], kind="stable"
        )
        rank_from_end = order.groupby("user_id", sort=False).cumcount(ascending=False)
        size = order.groupby("user_id", sort=False)["user_id"].transform("size")
        is_test = (rank_from_end < leave_last_n) & (size > leave_last_n)
        train = order[~is_test].drop(columns="_pos")
        test = order[is_test].drop(columns="_pos")
    else:
        if cutoff is not None:
            cut = _as_utc(cutoff)
        elif quantile is not None:
            if not 0.0 < quantile < 1.0:
                raise ValueError("quantile must be in (0, 1)")
            cut = events["timestamp"].quantile(quantile)
        else:
            raise ValueError("give cutoff, quantile or leave_last_n")
        before = events["timestamp"] < cut
        train, test = events[before], events[~before]
    return (
        train.sort_values("timestamp", kind="stable").reset_index(drop=True),
        test.sort_values("timestamp", kind="stable").reset_index(drop=True),
    )
