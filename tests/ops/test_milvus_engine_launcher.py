"""The engine launcher draws fresh internal ports when one is taken before Milvus binds it."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest

from ops import milvus_engine_launcher as launcher


def test_a_port_taken_meanwhile_is_drawn_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[dict[str, Any]] = []

    class FakeConfig:
        def __init__(self, **kwargs: Any) -> None:
            self.kwargs = kwargs

        def resolve(self) -> None:
            seen.append(self.kwargs)
            if len(seen) < 3:  # as the package reports a port another process took
                raise RuntimeError("set index_node_port=54279, but bind failed")

    fake = types.ModuleType("milvus")
    fake.MilvusServerConfig = FakeConfig  # type: ignore[attr-defined]
    fake._initialize_data_files = lambda home: None  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "milvus", fake)
    started: list[list[str]] = []
    monkeypatch.setattr(launcher.os, "execve", lambda exe, argv, env: started.append(argv))
    monkeypatch.chdir(tmp_path)
    args = ["--data", str(tmp_path / "data"), "--home", str(tmp_path / "home")]
    launcher.main([*args, "--port", "19530", "--metrics-port", "19091"])
    assert len(seen) == 3 and started  # two failed draws, then the engine starts
    drawn = [tuple(s[name] for name in launcher.INTERNAL_PORTS) for s in seen]
    assert drawn[0] != drawn[2]  # every internal port drawn afresh
    assert all(s["proxy_port"] == 19530 for s in seen)

    seen.clear()
    monkeypatch.setattr(launcher, "BIND_ATTEMPTS", 2)
    with pytest.raises(RuntimeError, match="bind failed"):  # gives up after its attempts
        launcher.main([*args, "--port", "19530", "--metrics-port", "19091"])
