"""recsys_client against in-process servers with the gateway's real interceptors (auth, rate
limit, TLS): typed calls, retries through the service config, keys, errors, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from recsys_client import (
    InvalidArgumentError,
    PermissionDeniedError,
    RecommenderClient,
    ResourceExhaustedError,
    Tls,
    UnauthenticatedError,
    UnavailableError,
    cli,
    pb,
    service_config,
)
from recsys_client.errors import from_rpc_error

from core.config import Settings
from services.reliability.auth import hash_key
from services.reliability.tls import server_credentials
from tests.services.reliability.certs import Pki, make_pki
from tests.services.reliability.conftest import FakeServicer, running_server

KEYS = {
    hash_key("admin-key"): {"client": "ops", "scopes": ["admin"]},
    hash_key("app-key"): {"client": "app", "scopes": ["read", "write"], "user": "u42"},
}


class FlakyServicer(FakeServicer):
    """Answers UNAVAILABLE to the first ``fail`` calls of each RPC; records what it saw."""

    def __init__(self, fail: int = 0) -> None:
        super().__init__()
        self.fail = fail
        self.seen: dict[str, list[Any]] = {}
        self.lock = threading.Lock()

    def _flaky(self, name: str, request: Any, context: grpc.ServicerContext) -> None:
        with self.lock:
            attempts = self.seen.setdefault(name, [])
            attempts.append(request)
            failing = len(attempts) <= self.fail
        if failing:
            context.abort(grpc.StatusCode.UNAVAILABLE, "try again")

    def IngestEvents(self, request: Any, context: Any) -> pb.IngestEventsResponse:
        self._flaky("IngestEvents", request, context)
        return super().IngestEvents(request, context)

    def DeleteUser(self, request: Any, context: Any) -> pb.DeleteUserResponse:
        self._flaky("DeleteUser", request, context)
        return super().DeleteUser(request, context)

    def StreamIngestEvents(self, request_iterator: Any, context: Any) -> Any:
        messages = list(request_iterator)
        self.seen.setdefault("StreamIngestEvents", []).extend(messages)
        return pb.StreamIngestEventsResponse(accepted_count=sum(len(m.events) for m in messages))


def _settings(**extra: Any) -> Settings:
    base = {"grpc_workers": 8, "max_in_flight": 4}
    return Settings.model_validate({**base, **extra})


def _event(user: str = "u42", key: str = "") -> pb.Event:
    return pb.Event(user_id=user, item_id="i1", event_type=pb.EVENT_TYPE_CLICK, idempotency_key=key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _prod_settings(pki: Pki) -> Settings:
    """Mutual TLS and API keys, like the deployed gateway."""
    return _settings(
        auth_mode="api_key",
        api_keys=json.dumps(KEYS),
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
        tls_client_ca_file=str(pki.ca),
    )


@pytest.fixture()
def prod_like(pki: Pki) -> Iterator[tuple[str, FlakyServicer]]:
    settings = _prod_settings(pki)
    with running_server(settings, FlakyServicer(), server_credentials(settings)) as (target, s):
        yield target, s  # type: ignore[misc]


def _mtls(pki: Pki) -> Tls:
    return Tls(pki.ca, pki.client_cert, pki.client_key)


def test_service_config_retries_idempotent_calls_only() -> None:
    config = json.loads(service_config(max_attempts=9))
    (method_config,) = config["methodConfig"]
    names = {n["method"] for n in method_config["name"]}
    reads = {"Recommend", "SimilarItems", "GetUserProfile", "GetItem", "ListItems", "RankItems"}
    assert names == reads | {"IngestEvents", "UpsertItems"}  # never DeleteUser, DeleteItem
    policy = method_config["retryPolicy"]
    assert policy["maxAttempts"] == 5  # gRPC's ceiling
    assert set(policy["retryableStatusCodes"]) == {"UNAVAILABLE", "RESOURCE_EXHAUSTED"}
    assert json.loads(service_config(max_attempts=1)) == {"methodConfig": []}


def test_errors_carry_decoded_details() -> None:
    status = status_pb2.Status(code=3, message="bad")
    bad = error_details_pb2.BadRequest()
    bad.field_violations.add(field="user_id", description="too long")
    info = error_details_pb2.ErrorInfo(reason="ID_TOO_LONG", domain="recsys.v1")
    info.metadata["limit"] = "128"
    retry = error_details_pb2.RetryInfo()
    retry.retry_delay.FromMilliseconds(1500)
    for detail in (bad, info, retry):
        status.details.add().Pack(detail)
    unknown = any_pb2.Any(type_url="type.example/x", value=b"1")
    status.details.append(unknown)

    class Raw(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.INVALID_ARGUMENT

        def details(self) -> str:
            return "bad"

        def trailing_metadata(self) -> Any:
            return (("grpc-status-details-bin", status.SerializeToString()),)

    err = from_rpc_error(Raw())
    assert isinstance(err, InvalidArgumentError) and isinstance(err, grpc.RpcError)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details() == "bad"
    assert err.field_violations == [("user_id", "too long")]
    assert err.reason == "ID_TOO_LONG" and err.domain == "recsys.v1"
    assert err.error_metadata == {"limit": "128"}
    assert err.retry_delay == 1.5
    assert unknown in err.error_details and not err.retryable


def test_mutual_tls_and_api_keys(prod_like: tuple[str, FlakyServicer], pki: Pki) -> None:
    target, _ = prod_like
    with RecommenderClient(target, 5, api_key="admin-key", tls=_mtls(pki)) as client:
        assert client.serving()
        assert client.recommend("anyone").model_version == "ops"  # the admitted client
        assert client.profile("anyone").user_id == "ops"
        assert client.similar("i1").items == []
        assert client.upsert_items([pb.Item(item_id="i", title="t")]).upserted_count == 1
        assert client.delete_user("anyone").existed
    with (
        RecommenderClient(target, 5, tls=_mtls(pki)) as client,
        pytest.raises(UnauthenticatedError),
    ):
        client.recommend("anyone")
    with (
        RecommenderClient(target, 5, api_key="admin-key", tls=Tls(pki.ca)) as client,
        pytest.raises(UnavailableError),  # no client certificate: no handshake
    ):
        client.recommend("anyone", timeout=2)


def test_user_bound_key_reads_only_its_user(prod_like: tuple[str, FlakyServicer], pki: Pki) -> None:
    target, servicer = prod_like
    with RecommenderClient(target, 5, api_key="app-key", tls=_mtls(pki)) as client:
        assert client.recommend("u42").model_version == "app"
        client.profile("u42")
        client.similar("i1")  # names no user
        with pytest.raises(PermissionDeniedError):
            client.recommend("someone-else")
        with pytest.raises(PermissionDeniedError):
            client.profile("someone-else")
        with pytest.raises(PermissionDeniedError):
            client.ingest([_event("u42"), _event("someone-else")])
        assert client.ingest([_event("u42")]).accepted_count == 1
        # the stream stops at the first message for another user, which is never delivered
        with pytest.raises(PermissionDeniedError):
            client.ingest_stream([_event("u42"), _event("someone-else")], batch_size=1)
        delivered = servicer.seen["StreamIngestEvents"]
        assert [e.user_id for m in delivered for e in m.events] == ["u42"]


def test_ingest_is_retried_with_the_same_keys() -> None:
    with running_server(_settings(), FlakyServicer(fail=2)) as (target, servicer):
        servicer = servicer  # type: ignore[assignment]
        with RecommenderClient(target, 5) as client:
            events = [_event(), _event(key="mine")]
            assert client.ingest(events).accepted_count == 2
            attempts = servicer.seen["IngestEvents"]  # type: ignore[attr-defined]
            assert len(attempts) == 3  # two UNAVAILABLE, then OK, all within one call
            keys = [[e.idempotency_key for e in a.events] for a in attempts]
            assert keys[0] == keys[1] == keys[2] and keys[0][1] == "mine"
            assert len(keys[0][0]) == 32 and events[0].idempotency_key == keys[0][0]
            with pytest.raises(UnavailableError):  # DeleteUser is never retried
                client.delete_user("u")
            assert len(servicer.seen["DeleteUser"]) == 1  # type: ignore[attr-defined]


def test_rate_limited_call_waits_for_the_retry_hint() -> None:
    settings = _settings(rate_limit_rps=2.0, rate_limit_burst=1)
    with running_server(settings) as (target, servicer):
        with RecommenderClient(target, 5, max_attempts=1) as once:
            once.recommend("u")
            with pytest.raises(ResourceExhaustedError) as err:
                once.recommend("u")
            delay = err.value.retry_delay
            assert delay is not None and 0 < delay <= 0.5 * 1.2 + 0.001
            assert err.value.retryable
        time.sleep(0.6)
        with RecommenderClient(target, 5) as client:
            client.recommend("u")
            started = time.monotonic()
            client.recommend("u")  # rejected once, retried after the server's hint
            took = time.monotonic() - started
        assert 0.3 <= took < 2.0
        assert servicer.calls == 3


def test_stream_helper_batches_and_fills_keys() -> None:
    with running_server(_settings(), FlakyServicer()) as (target, servicer):
        with RecommenderClient(target, 5) as client:
            events = (_event(f"u{i}") for i in range(5))  # a generator: consumed lazily
            assert client.ingest_stream(events, batch_size=2).accepted_count == 5
        messages = servicer.seen["StreamIngestEvents"]  # type: ignore[attr-defined]
        assert [len(m.events) for m in messages] == [2, 2, 1]
        keys = {e.idempotency_key for m in messages for e in m.events}
        assert len(keys) == 5 and "" not in keys
        with pytest.raises(ValueError):
            RecommenderClient(target, timeout=0)


def test_cli_over_mutual_tls_from_environment(
    prod_like: tuple[str, FlakyServicer],
    pki: Pki,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    target, _ = prod_like
    env = {
        "RECSYS_TARGET": target,
        "RECSYS_API_KEY": "admin-key",
        "RECSYS_CA_FILE": str(pki.ca),
        "RECSYS_CERT_FILE": str(pki.client_cert),
        "RECSYS_KEY_FILE": str(pki.client_key),
        "RECSYS_TIMEOUT": "5",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["profile", "--user", "u1"]) == 0
    assert "user ops:" in capsys.readouterr().out
    assert cli.main(["ingest", "--user", "u1", "--item", "i1", "--idempotency-key", "k1"]) == 0
    assert "accepted 1 event(s)" in capsys.readouterr().out
    assert cli.main(["--api-key", "wrong", "recommend", "--user", "u1"]) == 1  # flag wins
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    monkeypatch.setenv("RECSYS_CA_FILE", str(pki.server_key.parent / "missing.pem"))
    assert cli.main(["recommend", "--user", "u1"]) == 2
    args = cli.build_parser({}).parse_args(["recommend", "--user", "x"])
    assert (args.target, args.tls, args.api_key) == ("localhost:50051", False, None)


def test_client_package_stays_lean() -> None:
    """Importing the client loads neither the platform nor its heavy dependencies."""
    code = (
        "import sys, recsys_client, recsys_client.cli; "
        "bad = {'torch', 'ray', 'pydantic', 'numpy', 'core', 'services', 'transformers'}; "
        "print(sorted(bad & {m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    pyproject = Path(__file__).resolve().parents[2] / "clients" / "python" / "pyproject.toml"
    import tomllib

    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in deps}
    assert names == {"grpcio", "protobuf", "googleapis-common-protos"}


# --- one client over several connections ------------------------------------------------
# Calls take turns, so gateway processes sharing a port (spread by connection) and an L4
# Service's pods all get a busy client's calls.


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
def peers_server() -> Iterator[tuple[str, Peers]]:
    with running_server(Settings(grpc_workers=8), Peers()) as (target, servicer):
        yield target, servicer  # type: ignore[misc]


def test_one_connection_by_default_even_for_several_clients(
    peers_server: tuple[str, Peers],
) -> None:
    """What ``connections`` is for: gRPC shares one connection among a process's channels
    to one target, so two clients alone are still one connection."""
    target, servicer = peers_server
    with RecommenderClient(target) as a, RecommenderClient(target) as b:
        for _ in range(3):
            a.recommend("u1")
            b.recommend("u1")
    assert sum(servicer.peers.values()) == 6
    assert len(servicer.peers) == 1


def test_calls_take_turns_over_the_connections(peers_server: tuple[str, Peers]) -> None:
    target, servicer = peers_server
    with RecommenderClient(target, connections=3) as client:
        assert client.serving()
        for _ in range(6):
            client.recommend("u1")
    assert sorted(servicer.peers.values()) == [2, 2, 2]


def test_turns_are_shared_fairly_between_threads(peers_server: tuple[str, Peers]) -> None:
    target, servicer = peers_server
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


def test_several_connections_over_mutual_tls(pki: Pki) -> None:
    settings, peers = _prod_settings(pki), Peers()
    with (
        running_server(settings, peers, server_credentials(settings)) as (target, _),
        RecommenderClient(target, api_key="admin-key", tls=_mtls(pki), connections=2) as client,
    ):
        assert client.recommend("u1").model_version == "ops"  # each connection admitted
        assert client.recommend("u1").model_version == "ops"
    assert len(peers.peers) == 2


def test_serving_asks_every_connection_and_bad_counts_are_refused() -> None:
    with running_server(Settings(grpc_workers=4)) as (target, _):
        client = RecommenderClient(target, connections=2)
        assert client.serving()
    assert not client.serving()  # the server is gone
    client.close()
    with pytest.raises(ValueError, match="connections"):
        RecommenderClient("127.0.0.1:1", connections=0)
