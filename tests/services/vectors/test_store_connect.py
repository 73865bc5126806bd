"""Connecting to Milvus: a failed connect is tried once more, then reported as
StoreUnavailable (the client library is faked: this is about the retry, not the server)."""

from __future__ import annotations

from typing import Any

import pytest

from core.config import Settings
from services.vectors import store as store_module
from services.vectors.store import StoreUnavailable, VectorStore


class FlakyClient:
    """Stands in for pymilvus's MilvusClient: its first ``fails`` constructions raise."""

    made = 0
    fails = 0

    def __init__(self, **kwargs: Any) -> None:
        FlakyClient.made += 1
        if FlakyClient.made <= FlakyClient.fails:
            raise RuntimeError("<_InactiveRpcError: StatusCode.UNAVAILABLE, Too many pings>")
        self.kwargs = kwargs


@pytest.fixture()
def flaky(monkeypatch: pytest.MonkeyPatch) -> type[FlakyClient]:
    monkeypatch.setattr(store_module, "MilvusClient", FlakyClient)
    monkeypatch.setattr(store_module, "CONNECT_RETRY_S", 0.0)
    FlakyClient.made = 0
    return FlakyClient


def test_a_connect_that_fails_once_is_tried_again(flaky: type[FlakyClient]) -> None:
    flaky.fails = 1
    store = VectorStore(Settings(milvus_uri="http://127.0.0.1:1"))
    client = store._connect()
    assert isinstance(client, FlakyClient) and flaky.made == 2
    assert store._connect() is client  # connected: no new client


def test_a_connect_that_keeps_failing_is_store_unavailable(flaky: type[FlakyClient]) -> None:
    flaky.fails = 5
    store = VectorStore(Settings(milvus_uri="http://127.0.0.1:1"))
    with pytest.raises(StoreUnavailable, match="Too many pings"):
        store._connect()
    assert flaky.made == store_module.CONNECT_ATTEMPTS
