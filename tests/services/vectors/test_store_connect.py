"""Connecting to Milvus: a failed connect is tried once more, then reported as
StoreUnavailable (the client library is faked: this is about the retry, not the server);
and a server that accepts connections but never answers (a real socket, the real client)
costs each call its own timeout, not the connect's."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
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


@pytest.fixture()
def mute_server() -> Iterator[str]:
    """A port that completes TCP handshakes (the kernel's backlog) and never says a word."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


def test_a_mute_server_costs_concurrent_calls_their_own_timeout(mute_server: str) -> None:
    """Before: two 5 s connects per call, the calls queued on the connect lock behind each
    other (10, 20, 30 s for three reads of 0.3 s). Now each gives up within its timeout."""
    store = VectorStore(Settings(milvus_uri=mute_server))
    took: list[float] = []
    errors: list[BaseException] = []

    def read() -> None:
        start = time.monotonic()
        try:
            store.get_items(["1"], 0.3)
        except StoreUnavailable as exc:
            errors.append(exc)
        took.append(time.monotonic() - start)

    threads = [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(errors) == 3, errors  # every read failed as unavailable, none hung
    assert max(took) < 1.5, took  # 0.3 s each, with room for a loaded machine
