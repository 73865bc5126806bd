"""Logged exposures: which items a response showed to whom, and when.

The gateway records one exposure per response for users in A/B experiments, or for every
response with ``RECSYS_EXPOSURE_LOGGING=all`` (:mod:`services.experiments`);
``python -m ops.export_events`` writes those of the exposures stream (or of a JSONL exposure
log) beside the events as ``exposures.parquet``. The feature ranker trains on them besides
its replayed candidates
(:func:`training.data.candidates.exposure_groups`): a shown item the user did not go on to
like is a negative from what was really served, which no replay can invent.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

EXPOSURES_FILE = "exposures.parquet"
COLUMNS = ["user_id", "timestamp", "items", "request_id"]


def empty_exposures() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": pd.Series([], dtype=object),
            "timestamp": pd.Series([], dtype="datetime64[ns, UTC]"),
            "items": pd.Series([], dtype=object),
            "request_id": pd.Series([], dtype=object),
        }
    )


def load_exposures(root: str | Path) -> pd.DataFrame:
    """The dataset directory's ``exposures.parquet`` (``user_id, timestamp, items,
    request_id``; one row per response, oldest first), or no rows where there is none.
    Rows without a user or without items are dropped: they cannot label anything."""
    path = Path(root) / EXPOSURES_FILE
    if not path.exists():
        return empty_exposures()
    frame = pd.read_parquet(path, columns=COLUMNS)
    frame["user_id"] = frame["user_id"].astype(str)
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True)
    frame["items"] = [[str(i) for i in items] for items in frame["items"]]
    kept = (frame["user_id"] != "") & (frame["items"].map(len) > 0)
    return frame[kept].sort_values("timestamp", kind="stable").reset_index(drop=True)
