"""``Profiles.merged``, the fold a profile read applies to the events no worker applied yet
(unit: a fake store; the real one, against what a worker writes, is in
``tests/services/events/test_profile_worker.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from core.rows import user_row
from services.api import pb
from services.deadline import Deadline
from services.profiles.profiles import Profiles


class Store:
    """Items with a unit vector each; counts the nearest-segment searches."""

    def __init__(self) -> None:
        self.searches = 0

    def get_items(self, ids: Sequence[str], timeout: float, with_vectors: bool = False) -> Any:
        vector = [1.0, 0.0, 0.0]
        return {i: {"title": f"T{i}", "categories": ["Drama"], "vector": vector} for i in ids}

    def nearest_segments(self, vectors: np.ndarray, timeout: float) -> list[Any]:
        self.searches += 1
        return [{"segment_id": "seg-near"} for _ in vectors]


def clicks(user: str, items: Sequence[str], first_seq: int) -> list[tuple[int, pb.Event]]:
    out = []
    for n, item in enumerate(items):
        event = pb.Event(user_id=user, item_id=item, event_type=pb.EVENT_TYPE_CLICK)
        event.event_time.FromSeconds(1_700_000_000 + n)
        out.append((first_seq + n, event))
    return out


def test_a_known_user_keeps_the_rows_segment_and_a_new_one_gets_its_first_applys() -> None:
    store = Store()
    profiles = Profiles(store, None, 20)  # type: ignore[arg-type]
    row = user_row(
        "u",
        segment="seg-own",
        interests={},
        recent_items=["a"],
        seen_items=["a"],
        history_size=1,
        version=3,
    )
    known = profiles.merged(dict(row), clicks("u", ["b", "c"], 4), Deadline.after(5), False)
    assert known["segment"] == "seg-own" and "vector" not in known and store.searches == 0
    assert known["recent_items"] == ["c", "b", "a"] and known["history_size"] == 3
    assert known["version"] == 5
    new = profiles.merged(None, clicks("n", ["b"], 9), Deadline.after(5), True)
    assert new["segment"] == "seg-near" and store.searches == 1
    assert np.allclose(new["vector"], [1.0, 0.0, 0.0]) and new["version"] == 9
