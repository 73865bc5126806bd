"""The exploration-ceiling analysis on the small synthetic dataset."""

from __future__ import annotations

from pathlib import Path

from tests.training.evaluation.conftest import synthetic_generic
from tests.training.evaluation.test_sequence_system import FakeEncoder
from training.data import load_dataset
from training.evaluation.exploration import exploration_ceiling, with_new_slots


def test_new_slots_take_the_last_places_and_never_repeat_an_item() -> None:
    base = [f"p{i}" for i in range(10)]
    assert with_new_slots(base, ["n1", "n2"], 0) == base
    assert with_new_slots(base, ["n1", "n2"], 2) == [*base[:8], "n1", "n2"]
    assert with_new_slots(["n1", *base], ["n1"], 1) == [*base[:9], "n1"]
    assert with_new_slots(base, ["n1"], 3) == [*base[:9], "n1"]  # fewer new items than slots


def test_new_item_slots_reach_new_targets_that_popularity_never_does(tmp_path: Path) -> None:
    ds = load_dataset(synthetic_generic(tmp_path / "generic", users=200))  # 60: none in window
    out = exploration_ceiling(
        ds, val_quantile=0.8, slots=(0, 10), pools=(1, 1000), encoder=FakeEncoder()
    )
    assert out["users"] > 0 and 0 < out["new_items"] < out["items"]
    (new0, all0), (new10, all10) = out["rows"][1][0], out["rows"][1][10]
    assert new0 == 0.0  # trending popularity never ranks an item without training events
    assert new10 > 0.0  # ten slots of new items by content find some of those targets
    assert all10 < all0  # and cost the established targets
    assert out["rows"][1000][0] == out["rows"][1][0]  # the order matters only with slots
