"""What a release made from a training run serves: the feature ranker where the run chose
to serve it, the sequence model where the ranker (served or not) was trained with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.export.__main__ import served_feature_ranker, served_sequence
from training.models.feature_ranker import DCNv2, save_feature_ranker


@pytest.mark.parametrize(
    ("sequence_model", "ranker", "ranker_served", "sequence_served"),
    [
        (True, None, False, True),  # no feature ranker: the sequence model is a source only
        (True, True, True, True),
        (True, False, True, False),  # features it was not trained with would reach the ranker
        (False, True, True, False),
        # the retrieval order was as good: no ranker; the run's sequence choice still holds
        (True, True, False, True),
        (True, False, False, False),
    ],
)
def test_served_models(
    tmp_path: Path,
    sequence_model: bool,
    ranker: bool | None,
    ranker_served: bool,
    sequence_served: bool,
) -> None:
    if sequence_model:
        (tmp_path / "sequence").mkdir()
    if ranker is not None:
        model = DCNv2(sequence=ranker, served=ranker_served)
        save_feature_ranker(model, tmp_path / "feature_ranker")
    expected = str(tmp_path / "feature_ranker") if ranker_served else None
    assert served_feature_ranker(tmp_path) == expected
    assert served_sequence(tmp_path) == (str(tmp_path / "sequence") if sequence_served else None)


def test_a_ranker_saved_before_the_choice_is_served(tmp_path: Path) -> None:
    """Its config has no ``served`` key: it is served, as it was."""
    save_feature_ranker(DCNv2(), tmp_path / "feature_ranker")
    config = tmp_path / "feature_ranker" / "config.json"
    saved = json.loads(config.read_text())
    del saved["served"]
    config.write_text(json.dumps(saved))
    assert served_feature_ranker(tmp_path) == str(tmp_path / "feature_ranker")
