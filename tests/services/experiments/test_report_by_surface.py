"""Exposures record the request's surface and device; the A/B report breaks results down by
surface."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from services.experiments.assignment import Assignment, Variant
from services.experiments.exposures import ExposureLog, exposure_records, read_log
from services.experiments.report import main, summarise
from services.experiments.runtime import ExperimentService
from tests.services.experiments.test_runtime import CFG, FakeSettings


def test_exposures_carry_surface_and_device_only_when_sent(tmp_path: Path) -> None:
    svc = ExperimentService.from_settings(FakeSettings(tmp_path, CFG))
    assignments, _ = svc.for_user("u1")
    svc.exposed("u1", assignments, ["i1"], request_id="r1", surface="home", device="ios")
    svc.exposed("u1", assignments, ["i2"], request_id="r2")
    first, second = read_log(tmp_path / "experiments" / "exposures.jsonl")
    assert (first["surface"], first["device"]) == ("home", "ios")
    assert "surface" not in second and "device" not in second  # records as before
    a = [Assignment("mmr", "control", Variant())]
    (stream,) = exposure_records("u2", a, ["i3"], 1.0, "r3", "cart", "web")
    assert (stream["surface"], stream["device"]) == ("cart", "web")


def _traffic(log: ExposureLog) -> None:
    """home: treatment clicked 3 times in 4, control once; cart: nobody clicks; one
    exposure without a surface (a client that sends no context)."""
    for arm in ("control", "treatment"):
        a = [Assignment("mmr", arm, Variant())]
        for n in range(4):
            user = f"{arm}-{n}"
            log.record_exposures(user, a, ["h"], ts=10, request_id=f"{user}-h", surface="home")
            log.record_exposures(user, a, ["c"], ts=10, request_id=f"{user}-c", surface="cart")
            if n < (3 if arm == "treatment" else 1):
                log.record_feedback(user, a, ["h"], ts=11, recommendation_id=f"{user}-h")
    log.record_exposures("old", [Assignment("mmr", "control", Variant())], ["h"], ts=10)


def _arms(summary: dict[str, Any]) -> dict[tuple[str | None, str], tuple[int, int]]:
    return {(r.surface, r.arm): (r.trials, r.successes) for r in summary["arms"]}


def test_results_break_down_by_surface(tmp_path: Path) -> None:
    log = ExposureLog(tmp_path / "log.jsonl")
    _traffic(log)
    records = list(log.records())
    assert _arms(summarise(records)) == {(None, "control"): (9, 1), (None, "treatment"): (8, 3)}
    by_surface = summarise(records, by_surface=True)
    assert _arms(by_surface) == {
        ("-", "control"): (1, 0),
        ("cart", "control"): (4, 0),
        ("cart", "treatment"): (4, 0),
        ("home", "control"): (4, 1),
        ("home", "treatment"): (4, 3),
    }
    home = next(r for r in by_surface["arms"] if (r.surface, r.arm) == ("home", "treatment"))
    assert home.comparison is not None and home.comparison.diff == pytest.approx(0.5)
    # the control of a surface is that surface's control: "-" has no treatment to compare
    assert all(r.comparison is None for r in by_surface["arms"] if r.is_control)


def test_the_report_prints_and_writes_the_surface_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "log.jsonl"
    _traffic(ExposureLog(path))
    out_json = tmp_path / "report.json"
    assert main(["--log", str(path), "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "By surface" in out and "| experiment | surface | arm |" in out
    assert "| mmr | home | treatment * | 4 | 3 |" in out
    written = json.loads(out_json.read_text())
    assert {(r["surface"], r["arm"]) for r in written["by_surface"]} >= {("home", "control")}
    plain = tmp_path / "plain.jsonl"  # no surface recorded: the report is as before
    ExposureLog(plain).exposure("mmr", "control", "u", ["1"], ts=1)
    assert main(["--log", str(plain)]) == 0
    assert "By surface" not in capsys.readouterr().out
