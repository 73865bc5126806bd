"""The gateway's sequence-model inputs equal training's for the same events."""

from __future__ import annotations

import numpy as np
import pandas as pd

from core.sequence_inputs import (
    SEQUENCE_EVENTS,
    append_events,
    model_inputs,
    user_event_sequences,
)
from training.config import SequenceConfig
from training.models.sequence_data import build_item_space, user_inputs, user_sequences

T0 = 1_600_000_000


def _events(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    gaps = rng.choice([0, 1, 30, 4000, 90000], size=n)
    return pd.DataFrame(
        {
            "user_id": "u",
            "item_id": [f"i{k}" for k in rng.integers(0, 20, size=n)],
            "event_type": rng.choice(["view", "click", "rating", "purchase"], size=n),
            "timestamp": pd.to_datetime(T0 + np.cumsum(gaps), unit="s", utc=True),
            "value": np.nan,
            "weight": rng.choice([0.0, 0.5, 1.0], size=n),
        }
    )


def test_row_events_give_training_inputs() -> None:
    """Indexing's row (``user_event_sequences``), and the same row built event by event as
    the gateway's profile updates do, give the inputs training builds, ranks included for a
    history longer than the row keeps."""
    n, max_len = SEQUENCE_EVENTS + 30, SequenceConfig().max_seq_len
    events = _events(n)
    row = user_event_sequences(events)["u"]
    assert len(row["items"]) == SEQUENCE_EVENTS
    online: dict | None = None
    for r in events.itertuples():
        event = (r.timestamp.timestamp(), r.item_id, r.event_type, r.weight > 0)
        online = append_events(online, [event])
    assert online == row

    served = model_inputs(row, history_size=n, max_len=max_len)
    space = build_item_space(events, [f"i{k}" for k in range(20)], periods=2)
    trained = user_inputs([user_sequences(events, space)["u"]], max_len)
    index = space.index()
    assert [index[i] for i in served["items"][0]] == trained["items"][0].tolist()
    for name in ("tokens", "gaps", "ranks"):
        assert served[name][0].tolist() == trained[name][0].tolist(), name


def test_short_history_is_left_padded() -> None:
    row = append_events(None, [(T0 + 5, "b", "click", True), (T0, "a", "view", False)])
    assert row["items"] == ["a", "b"]  # time order, whatever the arrival order
    x = model_inputs(row, history_size=2, max_len=4)
    assert x["items"][0].tolist() == ["", "", "a", "b"]
    assert x["gaps"][0].tolist()[2:] == [1, 5]  # first event, then 5 s (3 + floor(log2 5))
    assert x["tokens"][0, :2].tolist() == [0, 0] and x["ranks"][0, 2:].tolist() == [1, 2]
    assert model_inputs(None, 0, 3)["tokens"].tolist() == [[0, 0, 0]]
