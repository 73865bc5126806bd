"""Per-release ensembles: written at export with every step pinned, retired when Triton
would no longer load a step version they name (no Triton needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.config import REPO_ROOT, Settings
from core.releases import pinned_model_name
from services.inference.triton_client import TritonClient
from tests.stack_fixtures import repository_sources
from training.export.repository import (
    ENSEMBLES,
    ensemble_steps,
    loaded_versions,
    new_release,
    pinned_release,
    prune,
    servable_models,
    versions,
)

COMPOSING = ("tokenizer", "item_encoder", "user_encoder")


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    return repository_sources(tmp_path / "repo")  # no release of this checkout in it


def _release(repo: Path, ranker: bool = True) -> int:
    """A fake release: every model staged as the exporter does, with placeholder files."""
    release = new_release(repo)
    for model in (*COMPOSING, *(("ranker",) if ranker else ())):
        (release.stage(model) / "model.onnx").write_bytes(b"onnx")
    for ensemble in ("item_embedder", "user_embedder", *(("ranker_scorer",) if ranker else ())):
        release.stage(ensemble)
    release.commit({"note": "test"})
    return release.version


def _pinned(repo: Path) -> list[str]:
    return sorted(d.name for d in repo.iterdir() if pinned_release(d.name) is not None)


def test_tracked_ensembles_follow_latest_and_the_composing_models_keep_two() -> None:
    for ensemble in ENSEMBLES:
        steps = ensemble_steps(
            (REPO_ROOT / "model_repository" / ensemble / "config.pbtxt").read_text()
        )
        assert steps and all(v == -1 for _, v in steps)


def test_each_release_gets_ensembles_pinned_to_its_own_steps(repo: Path) -> None:
    assert _release(repo) == 1 and _release(repo) == 2
    assert _pinned(repo) == [f"{e}_r{v}" for e in sorted(ENSEMBLES) for v in (1, 2)]
    config = (repo / "ranker_scorer_r1" / "config.pbtxt").read_text()
    assert 'name: "ranker_scorer_r1"' in config and "GENERATED" in config
    assert ensemble_steps(config) == [("tokenizer", 1), ("ranker", 1)]
    assert ensemble_steps((repo / "item_embedder_r2" / "config.pbtxt").read_text()) == [
        ("tokenizer", 2),
        ("item_encoder", 2),
    ]
    # the pinned ensemble is version N of its own model, with provenance
    assert versions(repo / "ranker_scorer_r1") == [1]
    meta = json.loads((repo / "ranker_scorer_r1" / "1" / "release.json").read_text())
    assert meta["steps"] == {"tokenizer": 1, "ranker": 1}
    # everything but the composing models' settings is copied from the tracked config
    tracked = (repo / "ranker_scorer" / "config.pbtxt").read_text()
    assert config.split("platform:")[1].replace(" 1\n", " -1\n") == tracked.split("platform:")[1]
    assert {"ranker_scorer_r1", "ranker_scorer_r2", "ranker_scorer"} <= set(servable_models(repo))
    assert not [p for d in repo.iterdir() for p in d.glob(".*")]  # no staging left


def test_a_release_retires_pinned_ensembles_triton_would_no_longer_load(repo: Path) -> None:
    for _ in range(3):
        _release(repo)
    # version_policy latest 2: release 1's steps are no longer loaded, so neither is r1
    assert loaded_versions(repo / "ranker") == [2, 3]
    assert _pinned(repo) == [f"{e}_r{v}" for e in sorted(ENSEMBLES) for v in (2, 3)]
    # a release without a ranker: ranker_scorer_r3 still has its tokenizer 3 and ranker 3
    assert _release(repo, ranker=False) == 4
    assert "ranker_scorer_r4" not in _pinned(repo)
    assert {"ranker_scorer_r3", "item_embedder_r4"} <= set(_pinned(repo))
    assert "ranker_scorer_r2" not in _pinned(repo)  # tokenizer 2 left the window
    assert prune(repo, keep=1)  # only release 4 of each model stays on disk
    assert _pinned(repo) == ["item_embedder_r4", "user_embedder_r4"]


def test_pinned_ensemble_without_a_step_version_is_not_written(repo: Path) -> None:
    release = new_release(repo)
    (release.stage("item_encoder") / "model.onnx").write_bytes(b"x")
    release.stage("item_embedder")
    assert release.commit({}) == {"item_encoder": 1, "item_embedder": 1}
    assert _pinned(repo) == []  # no tokenizer version to pin


def test_abort_leaves_nothing_behind(repo: Path) -> None:
    _release(repo)
    release = new_release(repo)
    release.stage("tokenizer")
    release.stage("item_encoder")
    release.stage("item_embedder")
    assert release.stage_pinned("item_embedder", {}) is not None
    release.abort()
    assert not [p for d in repo.iterdir() for p in d.glob(".*")]
    assert _pinned(repo) == ["item_embedder_r1", "ranker_scorer_r1", "user_embedder_r1"]


def test_the_gateway_calls_the_exporters_names() -> None:
    assert pinned_model_name("ranker_scorer", 7) == "ranker_scorer_r7"  # one name, in core
    pinned = TritonClient(Settings(triton_model_version="3", triton_url="127.0.0.1:1"))
    latest = TritonClient(Settings(triton_url="127.0.0.1:1"))
    try:
        assert pinned.target("ranker_scorer") == ("ranker_scorer_r3", "3")
        assert pinned.target("ranker_scorer", "2") == ("ranker_scorer_r2", "2")  # an A/B arm
        assert latest.target("item_embedder") == ("item_embedder", "")
        assert latest.target("ranker_scorer", "5") == ("ranker_scorer_r5", "5")
    finally:
        pinned.close()
        latest.close()
