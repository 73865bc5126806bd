"""A release serves the sequence model only when its feature ranker was trained with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.export.__main__ import served_sequence
from training.models.feature_ranker import DCNv2, save_feature_ranker


@pytest.mark.parametrize(
    ("sequence_model", "ranker", "served"),
    [
        (True, None, True),  # no feature ranker: the sequence model is a source only
        (True, True, True),
        (True, False, False),  # features it was not trained with would reach the ranker
        (False, True, False),
    ],
)
def test_served_sequence(
    tmp_path: Path, sequence_model: bool, ranker: bool | None, served: bool
) -> None:
    if sequence_model:
        (tmp_path / "sequence").mkdir()
    if ranker is not None:
        save_feature_ranker(DCNv2(sequence=ranker), tmp_path / "feature_ranker")
    expected = str(tmp_path / "sequence") if served else None
    assert served_sequence(tmp_path) == expected
