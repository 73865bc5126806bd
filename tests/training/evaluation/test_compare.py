"""Two evaluation runs compared per user: a real difference shows, noise does not, and runs
that cannot be paired are refused with a reason."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from training.evaluation.compare import CompareError, compare, main

SPLIT = {"kind": "global", "quantile": 0.8, "cutoff": "2016-03-22", "fold_in": 3, "seed": 0}


def run(scores: dict[str, dict[str, float]], system: str = "pipeline_served") -> dict[str, Any]:
    """A minimal eval.json: ``slice -> user -> NDCG@10`` of one system."""
    return {
        "dataset": {"path": "data/ml"},
        "split": dict(SPLIT),
        "per_user_ndcg@10": {s: {system: users} for s, users in scores.items()},
    }


def users(values: np.ndarray) -> dict[str, float]:
    return {f"u{i}": float(v) for i, v in enumerate(values)}


def test_a_lift_on_every_user_shows_and_noise_does_not() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(0.0, 0.5, 100)
    noise = base + rng.normal(0.0, 0.05, 100)
    rows = compare(
        run({"all": users(base), "cold_start": users(base)}),
        run({"all": users(base + 0.05), "cold_start": users(noise)}),
    )
    by = {r.slice: r for r in rows}
    assert by["all"].verdict == "higher" and by["all"].diff == pytest.approx(0.05)
    assert by["all"].low > 0 and by["all"].users == 100
    assert by["all"].other - by["all"].base == pytest.approx(by["all"].diff)
    assert by["cold_start"].verdict == "within noise"
    assert by["cold_start"].low < 0 < by["cold_start"].high


def test_only_common_users_and_slices_are_paired() -> None:
    rows = compare(
        run({"all": {"a": 0.2, "b": 0.4, "c": 1.0}, "warm": {"a": 0.1}}),
        run({"all": {"a": 0.1, "b": 0.2}, "new_items": {"a": 0.5}}),
    )
    assert [r.slice for r in rows] == ["all"]
    (row,) = rows
    assert row.users == 2 and row.base == pytest.approx(0.3) and row.other == pytest.approx(0.15)
    assert row.diff == pytest.approx(-0.15) and row.verdict == "lower"


def test_another_system_of_the_other_run() -> None:
    rows = compare(
        run({"all": {"a": 0.2}}),
        run({"all": {"a": 0.5}}, system="bpr"),
        other_system="bpr",
    )
    assert rows[0].diff == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.pop("per_user_ndcg@10"), "written before per-user scores"),
        (lambda r: r["split"].update(fold_in=5), "fold_in: 3 vs 5"),
        (lambda r: r["dataset"].update(path="data/shop"), "different datasets"),
    ],
)
def test_runs_that_cannot_be_paired_are_refused(change: Any, message: str) -> None:
    other = run({"all": {"a": 0.1}})
    change(other)
    with pytest.raises(CompareError, match=message):
        compare(run({"all": {"a": 0.2}}), other)


def test_an_unknown_system_names_the_known_ones() -> None:
    with pytest.raises(CompareError, match="no system 'ranker'; it has pipeline_served"):
        compare(run({"all": {"a": 0.2}}), run({"all": {"a": 0.2}}), "ranker")


def test_the_command_prints_and_writes_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, other = tmp_path / "release_a" / "eval.json", tmp_path / "release_b" / "eval.json"
    for path, lift in ((base, 0.0), (other, 0.1)):
        path.parent.mkdir()
        path.write_text(json.dumps(run({"all": users(np.linspace(0, 0.5, 50) + lift)})))
    out = tmp_path / "compare.md"
    assert main([str(base), str(other), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| all | 50 | 0.2500 | 0.3500 | +0.1000 |" in printed and "higher" in printed
    assert "release_b minus release_a" in printed and out.read_text() == printed
    # an unreadable run is an error message and exit code 2, not a traceback
    assert main([str(base), str(tmp_path / "missing.json")]) == 2
    assert "compare:" in capsys.readouterr().err
