"""Replay: held-out interactions -> assignment -> exposures -> clicks -> report, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.config import RETRIEVAL_SOURCES
from ops.ab_replay import (
    DEMO_EXPERIMENTS,
    OFFLINE_SOURCES,
    heldout_from_events,
    offline_arms,
    offline_mix,
    replay,
)
from services.experiments.assignment import Variant, assign, parse_experiments
from services.experiments.exposures import ExposureLog, read_log
from services.experiments.report import summarise
from tests.training.evaluation.conftest import synthetic_generic

EXPERIMENTS = json.dumps(
    [
        {
            "name": "mix",
            "salt": "t1",
            "arms": [
                {"name": "control", "weight": 50, "variant": {"retrieval_mix": {"popular": 1}}},
                {"name": "treatment", "weight": 50, "variant": {"retrieval_mix": {"ann": 1}}},
            ],
        }
    ]
)


def test_replay_with_a_known_better_arm(tmp_path: Path) -> None:
    (exp,) = parse_experiments(EXPERIMENTS)
    heldout = {f"u{i}": {f"hit{i}"} for i in range(400)}

    def recommend(user: str, variant: Variant, k: int) -> list[str]:
        # treatment always shows the held-out item, control only for every 4th user
        good = "ann" in (variant.retrieval_mix or {}) or int(user[1:]) % 4 == 0
        return ([f"hit{user[1:]}"] if good else []) + [f"filler{j}" for j in range(k)]

    log = ExposureLog(tmp_path / "replay.jsonl")
    stats = replay(heldout, [exp], recommend, log, k=5)
    assert stats["mix=control"]["users"] + stats["mix=treatment"]["users"] == 400
    recs = list(read_log(log.path))
    exposures = [r for r in recs if r["type"] == "exposure"]
    assert len(exposures) == 400
    for r in exposures:  # the logged arm is the deterministic assignment
        assert r["arm"] == assign(exp, r["user_id"]).name
        assert len(r["items"]) == 5
    s = summarise(recs)
    arms = {r.arm: r for r in s["arms"]}
    assert arms["treatment"].ctr == 1.0
    assert 0.15 < arms["control"].ctr < 0.35
    cmp = arms["treatment"].comparison
    assert cmp is not None and cmp.p_value < 1e-6 and cmp.ci_low > 0
    # replay is reproducible
    log2 = ExposureLog(tmp_path / "again.jsonl")
    replay(heldout, [exp], recommend, log2, k=5)
    assert (tmp_path / "again.jsonl").read_text() == log.path.read_text()


def test_offline_arms_end_to_end(tmp_path: Path) -> None:
    data = synthetic_generic(tmp_path / "data", users=80)
    heldout, recommend = offline_arms(data)
    assert heldout
    exps = parse_experiments(
        [
            {
                "name": "mix",
                "salt": "s",
                "arms": [
                    {"name": "control", "variant": {"retrieval_mix": {"popular": 1}}},
                    {
                        "name": "knn",
                        "variant": {"retrieval_mix": {"co_occurrence": 1, "segment": 1}},
                    },
                ],
            }
        ]
    )
    log = ExposureLog(tmp_path / "log.jsonl")
    replay(heldout, exps, recommend, log, k=10)
    s = summarise(read_log(log.path))
    assert {r.arm for r in s["arms"]} == {"control", "knn"}
    assert sum(r.trials for r in s["arms"]) == len(heldout)
    assert s["unattributed_clicks"] == 0
    # ann replays as the pretrained content model, loaded only with content=True
    with pytest.raises(ValueError, match="'ann' replays as 'content_pretrained'"):
        recommend(next(iter(heldout)), Variant(retrieval_mix={"ann": 1.0}), 10)


def test_gateway_sources_map_explicitly_to_offline_systems() -> None:
    assert set(OFFLINE_SOURCES) == set(RETRIEVAL_SOURCES)  # every gateway source, no other
    loaded = set(OFFLINE_SOURCES.values())
    assert offline_mix({"popular": 2, "co_occurrence": 1, "segment": 0.5, "ann": 1}, loaded) == {
        "popularity_trending": 2.0,
        "itemknn": 1.0,
        "bpr": 0.5,
        "content_pretrained": 1.0,
    }
    with pytest.raises(ValueError, match="'itemknn' has no offline counterpart"):
        offline_mix({"itemknn": 1}, loaded)  # offline names are not accepted
    parse_experiments(DEMO_EXPERIMENTS)  # the demo is written in the gateway's names


def test_heldout_from_events(tmp_path: Path) -> None:
    from training.data import load_dataset

    ds = load_dataset(synthetic_generic(tmp_path / "d"))
    held = heldout_from_events(ds.events)
    assert held and all(isinstance(v, set) and v for v in held.values())
