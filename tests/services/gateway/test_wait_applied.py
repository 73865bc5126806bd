"""Read-your-writes after IngestEvents never costs the reply its deadline (unit, no server)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast

import pytest

from core.config import Settings
from services.deadline import Deadline
from services.gateway.servicer import RecommenderServicer


class Log:
    """Records the time the gateway gives each call and the budget it gives the wait."""

    def __init__(self) -> None:
        self.timeouts: list[float] = []
        self.budgets: list[float] = []

    def call(self, make: Callable[[Any], Any], timeout: float) -> None:
        self.timeouts.append(timeout)
        make(self)

    def wait_applied(self, last_seq: dict[str, int], timeout: float) -> None:
        self.budgets.append(timeout)


@pytest.mark.parametrize("left_s", [0.6, 1.2, 30.0])
def test_the_wait_for_the_workers_keeps_a_share_of_the_deadline_for_the_reply(
    left_s: float,
) -> None:
    """The wait's own budget and the time the gateway gives the call both stop short of the
    deadline (a tenth of it kept for the reply), whatever the configured wait."""
    log = Log()
    servicer = SimpleNamespace(
        settings=Settings(ingest_wait_applied_s=1.0), state=SimpleNamespace(events=log)
    )
    deadline = Deadline.after(left_s)
    RecommenderServicer._wait_applied(cast(RecommenderServicer, servicer), {"u": 7}, deadline)
    (timeout,), (budget,) = log.timeouts, log.budgets
    assert timeout <= 0.9 * left_s and budget <= min(1.0, 0.9 * left_s)
    assert budget >= min(1.0, 0.85 * left_s)  # and the wait still gets its time
