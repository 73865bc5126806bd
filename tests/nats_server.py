"""A real nats-server (JetStream, file storage) on free loopback ports, alone: for tests of the
event log's batch readers (A/B report, training export, tombstones) that need no gateway,
Milvus or Triton. Import the fixture: ``from tests.nats_server import nats_settings``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from core.config import Settings
from ops.processes import free_port, nats_healthy, nats_process
from services.events.log import EventLog
from services.events.scan import with_log

T = TypeVar("T")


@pytest.fixture
def nats_settings(tmp_path: Path) -> Iterator[Settings]:
    """Settings pointing at a fresh nats-server (stopped after the test)."""
    port, monitor = free_port(), free_port()
    proc = nats_process(tmp_path / "nats", port, monitor, tmp_path).start()
    try:
        proc.wait_ready(lambda: nats_healthy(monitor), 30)
        yield Settings(nats_urls=f"nats://127.0.0.1:{port}", exposure_log=tmp_path / "x.jsonl")
    finally:
        proc.stop()


def on_log(settings: Settings, work: Callable[[EventLog], Awaitable[T]]) -> T:
    """``work`` on a fresh connection to the log (streams and buckets ensured)."""

    async def ensured(log: EventLog) -> T:
        await log.ensure()
        return await work(log)

    return asyncio.run(with_log(settings, ensured, "recsys-test"))
