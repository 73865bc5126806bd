"""One client over several connections: calls take turns, so gateway processes sharing a
port (spread by connection) and an L4 Service's pods all get a busy client's calls."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from recsys_client import RecommenderClient, Tls, pb

from core.config import Settings
from services.reliability.auth import hash_key
from services.reliability.tls import server_credentials
from tests.services.reliability.certs import make_pki
from tests.services.reliability.conftest import FakeServicer, running_server


class Peers(FakeServicer):
    """Counts the calls per client connection (the peer address the server saw)."""

    def __init__(self) -> None:
        super().__init__()
        self.peers: Counter[str] = Counter()
        self.peers_lock = threading.Lock()

    def Recommend(self, request: Any, context: Any) -> pb.RecommendResponse:
        with self.peers_lock:
            self.peers[context.peer()] += 1
        return super().Recommend(request, context)


@pytest.fixture()
def server() -> Iterator[tuple[str, Peers]]:
    with running_server(Settings(grpc_workers=8), Peers()) as (target, servicer):
        yield target, servicer  # type: ignore[misc]


def test_one_connection_by_default_even_for_several_clients(server: tuple[str, Peers]) -> None:
    """What ``connections`` is for: gRPC shares one connection among a process's channels
    to one target, so two clients alone are still one connection."""
    target, servicer = server
    with RecommenderClient(target) as a, RecommenderClient(target) as b:
        for _ in range(3):
            a.recommend("u1")
            b.recommend("u1")
    assert sum(servicer.peers.values()) == 6
    assert len(servicer.peers) == 1


def test_calls_take_turns_over_the_connections(server: tuple[str, Peers]) -> None:
    target, servicer = server
    with RecommenderClient(target, connections=3) as client:
        assert client.serving()
        for _ in range(6):
            client.recommend("u1")
    assert sorted(servicer.peers.values()) == [2, 2, 2]


def test_turns_are_shared_fairly_between_threads(server: tuple[str, Peers]) -> None:
    target, servicer = server
    with RecommenderClient(target, connections=2) as client:

        def calls() -> None:
            for _ in range(10):
                client.recommend("u1")

        threads = [threading.Thread(target=calls) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(servicer.peers.values()) == [20, 20]


def test_several_connections_over_mutual_tls(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    settings = Settings.model_validate(
        {
            "grpc_workers": 8,
            "auth_mode": "api_key",
            "api_keys": json.dumps({hash_key("k"): {"client": "app", "scopes": ["read"]}}),
            "tls_cert_file": str(pki.server_cert),
            "tls_key_file": str(pki.server_key),
            "tls_client_ca_file": str(pki.ca),
        }
    )
    tls = Tls(pki.ca, pki.client_cert, pki.client_key)
    peers = Peers()
    with (
        running_server(settings, peers, server_credentials(settings)) as (target, _),
        RecommenderClient(target, api_key="k", tls=tls, connections=2) as client,
    ):
        assert client.recommend("u1").model_version == "app"  # each connection admitted
        assert client.recommend("u1").model_version == "app"
    assert len(peers.peers) == 2


def test_serving_asks_every_connection_and_bad_counts_are_refused() -> None:
    with running_server(Settings(grpc_workers=4)) as (target, _):
        client = RecommenderClient(target, connections=2)
        assert client.serving()
    assert not client.serving()  # the server is gone
    client.close()
    with pytest.raises(ValueError, match="connections"):
        RecommenderClient("127.0.0.1:1", connections=0)
