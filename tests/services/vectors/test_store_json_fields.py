"""User rows' JSON fields are sent to Milvus as JSON text (pymilvus walks a dict value in
Python, a string it only validates): same values, the caller's rows untouched."""

from __future__ import annotations

import json

import numpy as np

from core.milvus_schema import USER_JSON_FIELDS
from core.rows import user_row
from core.sequence_inputs import append_events
from services.vectors.store import _json_encoded


def test_json_fields_become_json_text_and_the_callers_rows_stay_as_they_were() -> None:
    events = append_events(None, [(1_700_000_000.0, "i1", "click", True)])
    row = user_row(
        "u1",
        segment="s",
        interests={"Drama": 0.5, "Comédie": 0.5},
        recent_items=["i1"],
        seen_items=["i1"],
        history_size=1,
        events=events,
    )
    [sent] = _json_encoded([row])
    assert set(USER_JSON_FIELDS) <= set(sent)
    for key in USER_JSON_FIELDS:
        assert isinstance(sent[key], str) and json.loads(sent[key]) == row[key]  # type: ignore[literal-required]
    assert row["interests"] == {"Drama": 0.5, "Comédie": 0.5} and row["events"] == events
    assert {k: v for k, v in sent.items() if k not in USER_JSON_FIELDS} == {
        k: v for k, v in row.items() if k not in USER_JSON_FIELDS
    }


def test_numpy_values_in_json_fields_are_converted_as_pymilvus_would() -> None:
    row = user_row(
        "u1",
        segment="s",
        interests={"Drama": np.float32(0.5)},  # type: ignore[dict-item]
        recent_items=[],
        seen_items=[],
        history_size=0,
    )
    row["events"] = {"items": ["i1"], "tokens": np.array([3]), "seconds": [np.int64(7)]}  # type: ignore[dict-item]
    [sent] = _json_encoded([row])
    assert json.loads(sent["interests"]) == {"Drama": 0.5}
    assert json.loads(sent["events"]) == {"items": ["i1"], "tokens": [3], "seconds": [7]}
