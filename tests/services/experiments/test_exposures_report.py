"""Exposure log (thread safety, erasure), the A/B statistics and the report CLI."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest

from services.experiments.assignment import Assignment, Variant
from services.experiments.exposures import ExposureLog, read_log
from services.experiments.report import main, summarise, two_proportion_test


def test_concurrent_appends_are_whole_lines(tmp_path: Path) -> None:
    log = ExposureLog(tmp_path / "x" / "log.jsonl")

    def worker(t: int) -> None:
        for i in range(200):
            log.exposure("e", "control", f"u{t}-{i}", [str(j) for j in range(20)], ts=i)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    lines = (tmp_path / "x" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 1600
    assert all(json.loads(line)["type"] == "exposure" for line in lines)


def test_records_carry_the_arm_and_delete_user_rewrites(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    log = ExposureLog(path)
    a = [Assignment("mmr", "treatment", Variant(mmr_lambda=0.3))]
    log.record_exposures("alice", a, ["1", "2"], ts=10, request_id="r1")
    log.record_feedback("alice", a, ["2"], ts=11)
    log.exposure("mmr", "control", "bob", ["3"], ts=12)
    with path.open("a") as f:
        f.write('{"type": "exposure", "user_id": "alice", "ts"')  # torn last line
    recs = list(read_log(path))
    assert [r["type"] for r in recs] == ["exposure", "feedback", "exposure"]
    assert recs[0]["arm"] == "treatment" and recs[0]["request_id"] == "r1"
    assert recs[1] == {
        "type": "feedback",
        "ts": 11.0,
        "experiment": "mmr",
        "arm": "treatment",
        "user_id": "alice",
        "item_id": "2",
        "event": "click",
    }
    assert log.delete_user("alice") == 2
    assert [r["user_id"] for r in log.records()] == ["bob"]
    assert "alice" not in path.read_text()  # the torn line went too
    log.exposure("mmr", "control", "carol", ["4"], ts=13)  # appends still work afterwards
    assert [r["user_id"] for r in log.records()] == ["bob", "carol"]
    assert ExposureLog(tmp_path / "missing.jsonl").delete_user("x") == 0


def test_two_proportion_known_case() -> None:
    # control 100/1000, treatment 130/1000 (hand computation, matches R
    # prop.test(c(130, 100), c(1000, 1000), correct = FALSE): X-squared = 4.4215, p = 0.03549)
    c = two_proportion_test(100, 1000, 130, 1000)
    assert c.diff == pytest.approx(0.03)
    assert c.lift == pytest.approx(0.3)
    se = math.sqrt(0.1 * 0.9 / 1000 + 0.13 * 0.87 / 1000)
    assert c.ci_low == pytest.approx(0.03 - 1.959964 * se, abs=1e-6)
    assert c.ci_high == pytest.approx(0.03 + 1.959964 * se, abs=1e-6)
    assert c.ci_low == pytest.approx(0.002068, abs=1e-5)
    assert c.ci_high == pytest.approx(0.057932, abs=1e-5)
    assert c.z**2 == pytest.approx(4.4215, abs=1e-3)
    assert c.p_value == pytest.approx(0.03549, abs=1e-4)


def test_two_proportion_degenerate() -> None:
    c = two_proportion_test(0, 10, 0, 10)
    assert c.p_value == 1.0 and c.lift is None
    with pytest.raises(ValueError):
        two_proportion_test(0, 0, 1, 1)


def _write_known_case(path: Path) -> None:
    log = ExposureLog(path)
    for arm, n, clicks in (("control", 1000, 100), ("treatment", 1000, 130)):
        for i in range(n):
            user = f"{arm}-{i}"
            log.exposure("exp", arm, user, ["a", "b"], ts=100.0)
            if i < clicks:
                log.feedback("exp", arm, user, "b", ts=105.0)
    # not credited: before the exposure, outside the window, not an exposed item
    log.feedback("exp", "control", "control-999", "b", ts=50.0)
    log.feedback("exp", "control", "control-998", "b", ts=100.0 + 2 * 86400)
    log.feedback("exp", "control", "control-997", "zzz", ts=101.0)


def test_report_from_log_matches_known_case(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    _write_known_case(path)
    s = summarise(read_log(path))
    arms = {r.arm: r for r in s["arms"]}
    assert arms["control"].is_control and arms["control"].trials == 1000
    assert arms["control"].successes == 100 and arms["treatment"].successes == 130
    cmp = arms["treatment"].comparison
    assert cmp is not None and cmp.p_value == pytest.approx(0.03549, abs=1e-4)
    assert s["unattributed_clicks"] == 3
    # per-user unit gives the same counts here (one exposure per user)
    su = summarise(read_log(path), unit="user")
    assert {r.arm: r.successes for r in su["arms"]} == {"control": 100, "treatment": 130}


def test_report_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "log.jsonl"
    _write_known_case(path)
    out_json = tmp_path / "ab.json"
    assert main(["--log", str(path), "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "| exp | treatment |" in text and "+30.00%" in text and "0.0355" in text
    data = json.loads(out_json.read_text())
    assert {a["arm"] for a in data["arms"]} == {"control", "treatment"}
    assert main(["--log", str(tmp_path / "none.jsonl")]) == 2


def test_clicks_join_by_recommendation_id_else_by_user_and_window() -> None:
    def exposure(rid: str, ts: float, arm: str = "control") -> dict[str, object]:
        return {
            "type": "exposure",
            "ts": ts,
            "experiment": "e",
            "arm": arm,
            "user_id": "u",
            "items": ["a", "b"],
            "request_id": rid,
        }

    def click(ts: float, rid: str | None = None, item: str = "a") -> dict[str, object]:
        rec: dict[str, object] = {
            "type": "feedback",
            "ts": ts,
            "experiment": "e",
            "arm": "control",
            "user_id": "u",
            "item_id": item,
            "event": "click",
        }
        if rid:
            rec["recommendation_id"] = rid
        return rec

    records = [exposure("r1", 10), exposure("r2", 20), exposure("r3", 30)]
    # by id: r1, although r3 is the latest exposure of "a" before the click
    s = summarise([*records, click(40, "r1")], unit="exposure")
    assert s["joined_by_recommendation_id"] == 1 and s["arms"][0].successes == 1
    # an unknown id, or an id whose response did not show the item: by time (r3 / r3)
    s = summarise([*records, click(40, "nope"), click(41, "r1", item="z")], unit="exposure")
    assert s["joined_by_recommendation_id"] == 0 and s["unattributed_clicks"] == 1
    assert s["arms"][0].successes == 1
    # without an id, a click before every exposure is unattributed
    assert summarise([*records, click(5)])["unattributed_clicks"] == 1
