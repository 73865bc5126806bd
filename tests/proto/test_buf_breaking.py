"""The released-API gate of ``make lint``: ``buf breaking`` against the committed baseline
passes for the proto as it is and fails for a wire-incompatible change."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from core.config import REPO_ROOT

BUF = REPO_ROOT / "var" / "tools" / "node_modules" / ".bin" / "buf"
BASELINE = REPO_ROOT / "proto" / "releases" / "recsys-v1.binpb"
PROTO = Path("proto") / "recsys" / "v1" / "recommender.proto"

pytestmark = pytest.mark.skipif(not BUF.exists(), reason="buf is installed by make lint-proto")


def _breaking(workspace: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BUF), "breaking", "--against", str(BASELINE)],
        cwd=workspace,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_breaking_change_is_refused(tmp_path: Path) -> None:
    assert BASELINE.exists(), "make proto-release records the released API"
    shutil.copytree(REPO_ROOT / "proto", tmp_path / "proto")
    shutil.copy(REPO_ROOT / "buf.yaml", tmp_path / "buf.yaml")
    assert _breaking(tmp_path).returncode == 0
    proto = tmp_path / PROTO
    text = proto.read_text()
    renumbered = text.replace("string idempotency_key = 6;", "string idempotency_key = 16;")
    assert renumbered != text
    proto.write_text(renumbered)
    result = _breaking(tmp_path)
    assert result.returncode != 0
    assert "idempotency_key" in result.stdout + result.stderr
