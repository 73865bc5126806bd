"""A small ``make eval`` run completes and writes the report, JSON and plots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from core.paths import REPO_ROOT


def test_smoke_run_on_generic_data(
    generic_dir: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.evaluation",
            "--data",
            str(generic_dir),
            "--checkpoint",
            str(tiny_checkpoint),
            "--out",
            str(out),
            "--smoke",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((out / "eval.json").read_text())
    systems = set(result["metrics"]["all"])
    expected = {
        "popularity",
        "popularity_trending",
        "itemknn",
        "als",
        "bpr",
        "content_pretrained",
        "two_tower",
        "pipeline",
    }
    assert expected <= systems, result["skipped"]
    assert set(result["metrics"]) == {
        "all",
        "warm",
        "cold_start",
        "new_items",
        "next_items",
        "next_items_warm",
        "next_items_cold",
        "next_30_days",
    }
    for row in result["metrics"]["all"].values():
        assert 0.0 <= row["ndcg@10"] <= 1.0 and "novelty@10" in row and "ild@10" in row
    assert result["seed"] == 0 and result["split"]["quantile"] == 0.8
    assert "ranker from" in result["ranker"]
    md = (out / "eval.md").read_text()
    assert "Dataset" in md and "Split" in md and "Seed" in md and "Where the pipeline loses" in md
    for png in ("ndcg_by_slice.png", "accuracy_vs_beyond.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # per-user scores are kept, and are what the table averages
    for sname, systems in result["per_user_ndcg@10"].items():
        for name, users in systems.items():
            if users:
                mean = sum(users.values()) / len(users)
                assert abs(mean - result["metrics"][sname][name]["ndcg@10"]) < 1e-9
    # so a run compares with itself, paired, to no difference at all
    from training.evaluation.compare import compare

    rows = compare(result, result, "pipeline")
    assert {r.slice for r in rows} and all(r.diff == r.low == r.high == 0.0 for r in rows)


def test_missing_checkpoint_is_skipped_with_a_note(generic_dir: Path, tmp_path: Path) -> None:
    from training.evaluation.runner import EvalOptions, run_evaluation

    opts = EvalOptions(
        data=generic_dir,
        out=tmp_path,
        smoke=True,
        val_quantiles=(0.8,),
        bootstrap_samples=100,
    )
    opts.checkpoint = None
    result = run_evaluation(opts)
    assert "two_tower" in result["skipped"]
    assert "no --checkpoint" in result["skipped"]["two_tower"]
    assert "ranker stage skipped" in result["ranker"]
