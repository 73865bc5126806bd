"""What a release serves: the retrieval order and rankers trained in this process on replayed
groups, with and without the sequence model's features, compared on the last two cut-offs'
users."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from core.ranking_features import FEATURES
from training.config import FeatureRankerConfig
from training.release_choice import RELEASES, choose_release, cutoff_split

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


WEIGHTS = {"ann": 2.0, "co_occurrence": 0.5, "popular": 4.0, "sequence": 2.0}
RANKED = [FEATURES.index(f"{s}_rr") for s in ("ann", "co_occurrence", "popular")]


def retrieval_knows(with_sequence: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same users, whose clicks are the three candidates retrieval put first (every
    ranked source agrees on the order), without the sequence model."""
    out = []
    for n, g in enumerate(without_sequence(with_sequence)):
        features = g["features"].copy()
        rank = np.random.default_rng(n).permutation(30) + 1
        features[:, RANKED] = (1.0 / rank)[:, None]
        out.append({**g, "features": features, "labels": (rank <= 3).astype(np.float32)})
    return out


def test_both_served_where_the_sequence_model_lifts_the_ranker_over_everything() -> None:
    with_seq = groups()
    choice = choose_release(with_seq, without_sequence(with_seq), CFG, WEIGHTS)
    assert choice.ranker and choice.sequence
    # the users of the last two cut-offs, each window trained on the cut-offs before it
    assert choice.users == 80 and choice.cutoffs == (1, 2)
    last = dataclasses.replace(CFG, choice_windows=1)
    once = choose_release(with_seq, without_sequence(with_seq), last, WEIGHTS)
    assert once.users == 40 and once.cutoffs == (2,)
    # the default reads the last four cut-offs that have one before them
    longer = groups(cutoffs=6, users=10)
    four = choose_release(None, without_sequence(longer), CFG, WEIGHTS)
    assert four.users == 40 and four.cutoffs == (2, 3, 4, 5)
    assert "on the last 4 cut-offs' 40 users" in str(four)
    assert set(choice.ndcg) == {r.name for r in RELEASES}
    assert choice.best == "feature ranker + sequence model" == choice.name
    best, plain = choice.ndcg[choice.best], choice.ndcg["feature ranker"]
    assert best > 0.8 > 0.5 > plain
    assert best - plain > choice.standard_error["feature ranker"] > 0
    assert choice.standard_error[choice.best] == 0.0
    assert "serves the feature ranker + sequence model" in str(choice)
    assert choice.as_dict()["serves"] == choice.name


def test_the_retrieval_order_where_the_ranker_cannot_beat_it() -> None:
    """Retrieval already puts the clicks first: the ranker may learn as much, not more, and
    the cheapest release the windows cannot tell from the best serves no ranker."""
    plain = retrieval_knows(groups())
    choice = choose_release(None, plain, CFG, WEIGHTS)
    assert not choice.ranker and not choice.sequence
    assert set(choice.ndcg) == {"retrieval order", "feature ranker"}  # no sequence model
    assert choice.ndcg["retrieval order"] == pytest.approx(1.0)
    assert choice.ndcg["feature ranker"] <= choice.ndcg["retrieval order"]
    assert str(choice).startswith("serves the retrieval order:")


def test_the_sequence_model_not_served_where_it_adds_nothing() -> None:
    """Between releases the windows cannot tell apart, the cheaper wins: the same groups
    with and without the sequence model score alike, so the one without it is served."""
    plain = without_sequence(groups())
    choice = choose_release(plain, plain, CFG, WEIGHTS)
    assert not choice.sequence
    assert choice.ndcg["feature ranker"] == choice.ndcg["feature ranker + sequence model"]
    assert choice.ndcg["retrieval order"] == choice.ndcg["retrieval order + sequence model"]


def test_a_single_cut_off_is_no_evidence() -> None:
    """Nothing to train on before the last cut-off: no evidence that any model earns its
    cost, so the cheapest release."""
    with_seq = groups(cutoffs=1)
    choice = choose_release(with_seq, without_sequence(with_seq), CFG, WEIGHTS)
    assert not choice.ranker and not choice.sequence and choice.users == 0
    assert choice.cutoffs == ()
    assert str(choice) == "serves the retrieval order: 0 validation users, too few to compare"


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
