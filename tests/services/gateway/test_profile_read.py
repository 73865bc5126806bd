"""How the gateway reads a profile while the event log does not answer, and when an answer
is past its deadline (no Milvus, no log: fakes at both boundaries)."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any, cast

import pytest

from services.deadline import Deadline, DeadlineExceeded
from services.events.log import EventLogUnavailable
from services.gateway.servicer import RecommenderServicer
from services.gateway.state import GatewayState
from services.recommend.context import Recommendation, RequestContext
from tests.services.vectors.test_row_cache import UsersClient, _store


class DownLog:
    """An event log that never answers."""

    def call(self, fn: Any, timeout: float) -> Any:
        raise EventLogUnavailable("nats: no servers available")


def _state(client: UsersClient) -> GatewayState:
    state = GatewayState.__new__(GatewayState)  # only what profile() reads
    state.store = _store(client)  # type: ignore[arg-type]
    state.events = DownLog()  # type: ignore[assignment]
    return state


def test_while_the_log_is_down_a_profile_is_read_from_milvus_once() -> None:
    client = UsersClient()
    client.write("u1", 5)
    state = _state(client)
    row = state.profile("u1", Deadline.after(5.0), with_vector=False)
    assert row is not None and row["version"] == 5
    assert len(client.calls) == 1  # a cache miss is already Milvus's row: no second read
    client.write("u1", 9)  # a worker (another process) applied more events meanwhile
    row = state.profile("u1", Deadline.after(5.0), with_vector=False)
    # the cache answered, and the log cannot say what is missing from it: Milvus again
    assert row is not None and row["version"] == 9
    assert len(client.calls) == 2
    row = state.profile("u1", Deadline.after(5.0), with_vector=True)  # never cached
    assert row is not None and row["version"] == 9 and len(client.calls) == 3


class Exposures:
    def __init__(self) -> None:
        self.recorded: list[list[str]] = []

    def exposed(self, user_id: str, assignments: Any, items: list[str], **kw: Any) -> None:
        self.recorded.append(items)


def test_no_exposure_is_recorded_for_an_answer_past_its_deadline() -> None:
    servicer = RecommenderServicer.__new__(RecommenderServicer)
    exposures = Exposures()
    servicer.state = cast(GatewayState, SimpleNamespace(experiments=exposures))
    result = Recommendation(items=[], reasons=[])
    situation = RequestContext()
    with pytest.raises(DeadlineExceeded):
        servicer._exposed("u1", [], result, situation, Deadline(time.monotonic() - 0.001))
    assert exposures.recorded == []
    servicer._exposed("u1", [], result, situation, Deadline.after(5.0))
    assert exposures.recorded == [[]]
