"""Model-repository releases: numbering, staging, pruning (no Triton needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.stack_fixtures import repository_sources
from training.export.repository import latest_release, new_release, prune, servable_models, versions


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    return repository_sources(tmp_path / "repo")  # no release of this checkout in it


def test_release_numbers_and_atomic_commit(repo: Path) -> None:
    assert latest_release(repo) == 0 and servable_models(repo) == []
    release = new_release(repo)
    staging = release.stage("item_encoder")
    (staging / "model.onnx").write_bytes(b"x")
    assert (staging / "model.py").read_text() == (repo / "item_encoder" / "model.py").read_text()
    assert versions(repo / "item_encoder") == []  # nothing visible before commit
    release.stage("item_embedder")
    assert release.commit({"note": "t"}) == {"item_encoder": 1, "item_embedder": 1}
    assert servable_models(repo) == ["item_embedder", "item_encoder"]
    assert (repo / "item_encoder" / "1" / "release.json").is_file()
    second = new_release(repo)
    assert second.version == 2


def test_user_encoder_runs_the_shared_source(repo: Path) -> None:
    staging = new_release(repo).stage("user_encoder")
    assert not (staging / "model.py").is_symlink()
    assert "onnxruntime" in (staging / "model.py").read_text()


def test_stage_rejects_unknown_model_and_prune_keeps_newest(repo: Path) -> None:
    with pytest.raises(FileNotFoundError):
        new_release(repo).stage("nope")
    for v in (1, 2, 3, 4):
        (repo / "tokenizer" / str(v)).mkdir()
    removed = prune(repo, keep=2)
    assert versions(repo / "tokenizer") == [3, 4] and len(removed) == 2
