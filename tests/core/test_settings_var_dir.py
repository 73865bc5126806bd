"""Runtime files follow RECSYS_VAR_DIR: a pod's image has a read-only /app, so a default under
the repository (where /app/var would be) crashes the gateway at start (the container smoke
found exactly that for the exposure log)."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import REPO_ROOT, Settings


def test_exposure_log_follows_the_var_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RECSYS_EXPOSURE_LOG", raising=False)
    monkeypatch.setenv("RECSYS_VAR_DIR", "/tmp/recsys")
    assert Settings().exposure_log == Path("/tmp/recsys/experiments/exposures.jsonl")


def test_an_explicit_exposure_log_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_VAR_DIR", "/tmp/recsys")
    monkeypatch.setenv("RECSYS_EXPOSURE_LOG", "/data/exposures.jsonl")
    assert Settings().exposure_log == Path("/data/exposures.jsonl")


def test_local_default_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RECSYS_VAR_DIR", raising=False)
    monkeypatch.delenv("RECSYS_EXPOSURE_LOG", raising=False)
    assert Settings().exposure_log == REPO_ROOT / "var" / "experiments" / "exposures.jsonl"
