"""Starting a local Ray: the failed starts worth another try are tried again, others are not
(``ray`` is faked: this is about the retry, not about Ray)."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from training import ray_cluster


class FakeRay(types.ModuleType):
    """``ray.init`` raising the given errors in turn, then starting."""

    def __init__(self, errors: list[Exception]) -> None:
        super().__init__("ray")
        self.errors = errors
        self.inits = 0
        self.shutdowns = 0
        self.started = False

    def is_initialized(self) -> bool:
        return self.started

    def init(self, **kwargs: Any) -> None:
        self.inits += 1
        if self.errors:
            raise self.errors.pop(0)
        self.started = True

    def shutdown(self) -> None:
        self.shutdowns += 1


@pytest.fixture()
def no_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_cluster.time, "sleep", lambda _s: None)


def test_a_dashboard_that_dies_at_start_is_started_again(
    monkeypatch: pytest.MonkeyPatch, no_wait: None
) -> None:
    died = Exception("Failed to read dashboard.err file: [Errno 2] No such file or directory")
    ray = FakeRay([died])
    monkeypatch.setitem(sys.modules, "ray", ray)
    ray_cluster.connect(num_cpus=2)
    assert (ray.inits, ray.shutdowns, ray.started) == (2, 1, True)


def test_a_gcs_server_that_misses_its_port_file_is_started_again(
    monkeypatch: pytest.MonkeyPatch, no_wait: None
) -> None:
    late = RuntimeError(
        "Timed out waiting for file /tmp/ray/session_x/gcs_server_port_0123456789abcdef"
    )
    ray = FakeRay([late])
    monkeypatch.setitem(sys.modules, "ray", ray)
    ray_cluster.connect(num_cpus=2)
    assert (ray.inits, ray.shutdowns, ray.started) == (2, 1, True)


def test_other_start_failures_are_raised_at_once(
    monkeypatch: pytest.MonkeyPatch, no_wait: None
) -> None:
    ray = FakeRay([ValueError("object_store_memory is too large")])
    monkeypatch.setitem(sys.modules, "ray", ray)
    with pytest.raises(ValueError, match="object_store_memory"):
        ray_cluster.connect(num_cpus=2)
    assert ray.inits == 1


def test_a_start_that_keeps_failing_is_raised_after_the_attempts(
    monkeypatch: pytest.MonkeyPatch, no_wait: None
) -> None:
    ray = FakeRay([Exception("The raylet timed out during startup")] * 5)
    monkeypatch.setitem(sys.modules, "ray", ray)
    with pytest.raises(Exception, match="timed out during startup"):
        ray_cluster.connect(num_cpus=2, attempts=3)
    assert ray.inits == 3
