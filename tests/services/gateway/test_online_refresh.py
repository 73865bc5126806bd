"""When a gateway re-reads the online aggregates (no processes: the state's clock only)."""

from __future__ import annotations

import time

from core.config import Settings
from services.gateway.state import GatewayState


def test_the_online_aggregates_are_read_on_their_period_and_never_with_a_period_of_0() -> None:
    state = GatewayState.__new__(GatewayState)  # only what _online_due() reads
    state.settings = Settings(aggregates_refresh_s=5.0)
    state._online_at = 0.0
    assert state._online_due()  # never read yet
    state._online_at = time.monotonic()
    assert not state._online_due()  # read just now
    state.settings = Settings(aggregates_refresh_s=0.0)  # the served evaluation's
    state._online_at = 0.0
    assert not state._online_due()
