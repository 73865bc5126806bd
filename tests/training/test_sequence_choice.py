"""Whether a release serves the sequence model: rankers trained in this process on replayed
groups with and without its features, compared on the last two cut-offs' users."""

from __future__ import annotations

from typing import Any

import numpy as np

from core.ranking_features import FEATURES
from training.config import FeatureRankerConfig
from training.sequence_choice import choose_sequence, cutoff_split

CFG = FeatureRankerConfig(epochs=20, batch_size=8, lr=1e-2, hidden=[16], cross_layers=1)
SEQ = [FEATURES.index("sequence_rr"), FEATURES.index("sequence_logp")]


def groups(cutoffs: int = 3, users: int = 40, seed: int = 0) -> list[dict[str, Any]]:
    """Replayed groups whose clicks are the three candidates the sequence model puts first:
    its two features carry all the signal, every other feature is noise."""
    rng = np.random.default_rng(seed)
    out = []
    for cut in range(cutoffs):
        for u in range(users):
            features = rng.random((30, len(FEATURES))).astype(np.float32)
            logp = rng.normal(size=30).astype(np.float32)
            features[:, SEQ[1]] = logp
            features[:, SEQ[0]] = 1.0 / (2.0 + np.argsort(np.argsort(-logp)))
            labels = np.zeros(30, dtype=np.float32)
            labels[np.argsort(-logp)[:3]] = 1.0
            out.append(
                {
                    "user_id": f"{cut}-{u}",
                    "features": features,
                    "labels": labels,
                    "targets": 3,
                    "cutoff": cut,
                }
            )
    return out


def without_sequence(with_sequence: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same replay without the sequence model: its features at their fill (0)."""
    out = []
    for g in with_sequence:
        features = g["features"].copy()
        features[:, SEQ] = 0.0
        out.append({**g, "features": features})
    return out


def test_served_where_it_lifts_the_ranker_on_the_last_cut_offs_users() -> None:
    with_seq = groups()
    choice = choose_sequence(with_seq, without_sequence(with_seq), CFG)
    assert choice.serve
    # the users of the last two cut-offs, each window trained on the cut-offs before it
    assert choice.users == 80
    assert choose_sequence(with_seq, without_sequence(with_seq), CFG, windows=1).users == 40
    assert choice.with_sequence > 0.8 > 0.5 > choice.without
    assert choice.with_sequence - choice.without > choice.standard_error > 0
    assert "served" in str(choice) and choice.as_dict()["serve"] is True


def test_not_served_where_the_ranker_does_as_well_without_it() -> None:
    """Between choices the window cannot tell apart, the cheaper wins: the same groups on
    both sides (the sequence model adds nothing) train the same rankers."""
    plain = without_sequence(groups())
    choice = choose_sequence(plain, plain, CFG)
    assert not choice.serve
    assert choice.with_sequence == choice.without and choice.standard_error == 0.0
    assert "not served" in str(choice)


def test_a_single_cut_off_is_no_evidence() -> None:
    """Nothing to train on before the last cut-off: no evidence that it earns its cost."""
    with_seq = groups(cutoffs=1)
    choice = choose_sequence(with_seq, without_sequence(with_seq), CFG)
    assert not choice.serve and choice.users == 0


def test_a_cut_offs_users_validate_and_its_logged_responses_are_left_out() -> None:
    """A cut-off's replayed users validate the rankers trained on the cut-offs before it;
    logged responses after it are labelled by its validation period, so they neither train
    nor validate; earlier ones train."""
    replay = groups(cutoffs=3, users=2)
    logged = [{**g, "logged": True, "user_id": "r" + g["user_id"]} for g in replay]
    train, held_out = cutoff_split(replay + logged, 2)
    assert {g["cutoff"] for g in train} == {0, 1}
    assert len(train) == 8  # two cut-offs' users and their logged responses
    assert [g["user_id"] for g in held_out] == ["2-0", "2-1"]
    assert cutoff_split([], 2) == ([], [])
