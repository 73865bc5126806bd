"""When a gateway re-reads the online aggregates (no processes: the state's clock and a
faked event-log call only)."""

from __future__ import annotations

import time

from core.config import Settings
from core.exploration import DEFAULT_EXPLORATION_SHARE
from services.events.aggregates import Aggregates
from services.gateway.state import GatewayState
from services.recommend.retrieve import PopularItems


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


class _Log:
    """``events.call`` as the gateway's event-log client answers it: the aggregates, or an
    outage."""

    def __init__(self, online: Aggregates | None) -> None:
        self.online = online

    def call(self, fn: object, timeout: float) -> Aggregates:
        if self.online is None:
            raise ConnectionError("event log unreachable")
        return self.online


def test_with_a_period_of_0_the_share_the_index_recorded_is_still_read_once() -> None:
    """The served evaluation keeps popularity as indexed (period 0), but its gateway must
    still take the exploration share the indexing job chose; an outage at start retries."""
    state = GatewayState.__new__(GatewayState)
    state.settings = Settings(aggregates_refresh_s=0.0)
    state.popular = PopularItems(size=5)
    state.events = _Log(None)  # type: ignore[assignment]
    state._online_at = 0.0
    state._refresh_online()
    assert state._online_at == 0.0  # not read: the next poll tries again
    assert state.popular.exploration_share() == DEFAULT_EXPLORATION_SHARE
    state.events = _Log(Aggregates(1.0, {"a": 5.0}, {}, 1.0, exploration_share=0.3))  # type: ignore[assignment]
    state._refresh_online()
    assert state._online_at > 0  # read: not again with this period
    assert state.popular.exploration_share() == 0.3
    assert state.popular._online == {}  # popularity stays as indexed
    state.settings = Settings(aggregates_refresh_s=5.0)
    state._refresh_online()
    assert state.popular._online == {"a": 5.0}
