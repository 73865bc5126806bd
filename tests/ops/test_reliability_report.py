"""The reliability report file and its table."""

from __future__ import annotations

from pathlib import Path

import pytest

from ops import reliability_report as r


def test_record_load_render(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "report.jsonl"
    r.record(r.Scenario("ignored: no env"))
    assert not path.exists()
    monkeypatch.setenv("RECSYS_RELIABILITY_REPORT", str(path))
    s = r.Scenario("kill triton", acknowledged=10, found=10, recovery_s=3.25)
    s.answer("OK", degraded=True)
    s.answer("OK")
    s.answer("DEADLINE_EXCEEDED")
    r.record(s)
    r.record(r.Scenario("fuzz", requests=5))
    table = r.render(r.load(path))
    assert "| kill triton | 3 | OK 2, DEADLINE_EXCEEDED 1 | 1 | 10 / 10 | 3.2 s |" in table
    assert "| fuzz | 5 | - | 0 | - / - | - |" in table
    assert r.main([str(path)]) == 0
    assert r.main([str(tmp_path / "missing")]) == 1
