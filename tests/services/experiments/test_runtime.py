"""The gateway-facing ExperimentService: assign, log exposures and clicks, erase."""

from __future__ import annotations

import json
from pathlib import Path

from services.experiments.assignment import Variant
from services.experiments.exposures import read_log
from services.experiments.report import summarise
from services.experiments.runtime import ExperimentService

CFG = json.dumps(
    [
        {
            "name": "mmr",
            "salt": "s1",
            "arms": [
                {"name": "control", "weight": 50, "variant": {"mmr_lambda": 0.0}},
                {"name": "treatment", "weight": 50, "variant": {"mmr_lambda": 0.3}},
            ],
        }
    ]
)


class FakeSettings:
    def __init__(self, var_dir: Path, experiments: str, logging: str = "experiments") -> None:
        self.var_dir = var_dir
        self.experiments = experiments
        self.exposure_logging = logging


def test_service_round_trip(tmp_path: Path) -> None:
    svc = ExperimentService.from_settings(FakeSettings(tmp_path, CFG))
    assignments, variant = svc.for_user("u1")
    assert [a.experiment for a in assignments] == ["mmr"]
    assert variant == Variant(mmr_lambda=assignments[0].variant.mmr_lambda)
    assert svc.for_user("u1")[0] == assignments  # sticky
    svc.exposed("u1", assignments, ["i1", "i2"], request_id="r")
    svc.clicked("u1", ["i2"])
    svc.exposed("u2", svc.for_user("u2")[0], ["i3"])
    path = tmp_path / "experiments" / "exposures.jsonl"
    recs = list(read_log(path))
    assert [r["type"] for r in recs] == ["exposure", "feedback", "exposure"]
    assert recs[1]["arm"] == assignments[0].arm
    s = summarise(recs)
    assert sum(r.successes for r in s["arms"]) == 1
    assert svc.delete_user("u1") == 2
    assert [r["user_id"] for r in read_log(path)] == ["u2"]


def test_service_without_experiments_is_a_no_op(tmp_path: Path) -> None:
    svc = ExperimentService.from_settings(FakeSettings(tmp_path, ""))
    assert svc.for_user("u") == ([], Variant())
    svc.exposed("u", [], ["i"])
    svc.clicked("u", ["i"])
    assert svc.delete_user("u") == 0
    assert not list((tmp_path / "experiments").glob("*"))  # nothing recorded


def test_erasure_works_after_experiments_end(tmp_path: Path) -> None:
    """Records of a finished experiment are still erased by DeleteUser."""
    running = ExperimentService.from_settings(FakeSettings(tmp_path, CFG))
    assignments, _ = running.for_user("u")
    running.exposed("u", assignments, ["i"])
    ended = ExperimentService.from_settings(FakeSettings(tmp_path, ""))
    assert ended.delete_user("u") == 1


def test_logging_every_response_records_users_in_no_experiment_outside_the_report(
    tmp_path: Path,
) -> None:
    """``exposure_logging=all``: a response to a user in no experiment is an exposure under
    no experiment (what the ranker's training reads from an export); the A/B report and its
    click attribution leave it out; users in experiments are logged as before."""
    alone = ExperimentService.from_settings(FakeSettings(tmp_path, "", "all"))
    alone.exposed("u0", [], ["i1", "i2"], request_id="r0")
    alone.exposed("u0", [], [], request_id="nothing shown")
    svc = ExperimentService.from_settings(FakeSettings(tmp_path, CFG, "all"))
    assignments, _ = svc.for_user("u1")
    svc.exposed("u1", assignments, ["i3"], request_id="r1")
    svc.clicked("u1", ["i3"], recommendation_id="r1")
    recs = list(read_log(tmp_path / "experiments" / "exposures.jsonl"))
    assert [(r["type"], r["experiment"], r["user_id"]) for r in recs] == [
        ("exposure", "", "u0"),
        ("exposure", "mmr", "u1"),
        ("feedback", "mmr", "u1"),
    ]
    s = summarise(recs)
    assert {a.experiment for a in s["arms"]} == {"mmr"}
    assert [(a.trials, a.successes) for a in s["arms"] if a.trials] == [(1, 1)]
    assert alone.delete_user("u0") == 1
