"""The report judges issue #15's targets by their own numbers, and re-renders from its JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from training.evaluation import report


def _ci(diff: float, low: float, high: float) -> dict[str, float]:
    return {"diff": diff, "low": low, "high": high, "users": 100}


def _target(system: str, *, cold_ratio: float, next_ratio: float, all_high: float) -> dict:
    return {
        "evaluated": True,
        "system": system,
        "best_baseline_all": "popularity_trending",
        "pipeline_ndcg_all": 0.36,
        "best_baseline_ndcg_all": 0.37,
        "vs_best_baseline_all": _ci(-0.01, all_high - 0.05, all_high),
        "next_items": {
            "best_baseline": "popularity_trending",
            "ndcg": 0.16 * next_ratio,
            "best_baseline_ndcg": 0.16,
            "ratio": next_ratio,
            "vs_best_baseline": _ci(0.03, 0.01, 0.05),
        },
        "pipeline_ndcg_cold": 0.35 * cold_ratio,
        "popularity_ndcg_cold": 0.35,
        "relative_margin_cold": cold_ratio - 1,
        "vs_popularity_cold": _ci(0.05, 0.02, 0.08),
    }


METRICS: dict[str, Any] = {
    "all": {"pipeline": {"users": 100, "ndcg@10": 0.383}},
    "new_items": {
        "pipeline": {"users": 90, "ndcg@10": 0.0},
        "served": {"users": 90, "ndcg@10": 0.025},
    },
}


def _verdicts(lines: list[str]) -> dict[str, bool]:
    out = {}
    for line in lines:
        key = line.split(":")[0].removeprefix("- ")
        if "**met**" in line or "**NOT met**" in line:
            out[key] = "**met**" in line
    return out


def test_cold_start_needs_one_point_three_times_popularity() -> None:
    short = _verdicts(
        report.quality_target_lines(
            _target("pipeline", cold_ratio=1.24, next_ratio=1.25, all_high=0.02), METRICS
        )
    )
    assert short["Cold start"] is False  # +24%: the old +10% rule called this met
    assert short["Next items"] is True
    assert short["Long horizon, all users"] is True  # below on the mean, interval not entirely
    assert short["New items"] is False
    enough = _verdicts(
        report.quality_target_lines(
            _target("pipeline", cold_ratio=1.31, next_ratio=1.1, all_high=-0.001), METRICS
        )
    )
    assert enough["Cold start"] is True
    assert enough["Next items"] is False
    assert enough["Long horizon, all users"] is False  # the whole interval below 0


def test_a_served_system_is_held_to_the_offline_reference_and_new_items() -> None:
    lines = report.quality_target_lines(
        _target("served", cold_ratio=1.3, next_ratio=1.2, all_high=0.01), METRICS
    )
    verdicts = _verdicts(lines)
    assert verdicts["Long horizon against the offline reference `pipeline` 0.3830"] is False
    assert verdicts["New items"] is True  # 0.025 > 0.02
    assert not any(
        "offline reference" in line
        for line in report.quality_target_lines(
            _target("pipeline", cold_ratio=1.3, next_ratio=1.2, all_high=0.01), METRICS
        )
    )


def test_re_rendering_keeps_what_another_job_appended(tmp_path: Path, monkeypatch: Any) -> None:
    result = {"metrics": {}, "quality_target": {"evaluated": False, "reason": "x"}}
    monkeypatch.setattr(
        report,
        "render_markdown",
        lambda r: "# Offline evaluation\n\n## Quality targets (issue #15)\n\n- new\n",
    )
    (tmp_path / "eval.json").write_text(json.dumps(result))
    (tmp_path / "eval.md").write_text(
        "# Offline evaluation\n\n## Quality target\n\n- old\n\n## Quality targets (issue #15)\n\n"
        "- old verdicts\n\n## User segments (served stack, training users)\n\n- 8 segments\n"
    )
    assert report.main([str(tmp_path / "eval.json")]) == 0
    text = (tmp_path / "eval.md").read_text()
    assert "- new" in text and "old verdicts" not in text and "- old\n" not in text
    assert text.endswith("## User segments (served stack, training users)\n\n- 8 segments\n")
