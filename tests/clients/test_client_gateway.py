"""recsys_client and the ``recsys`` CLI against a real gateway process configured like prod:
mutual TLS and API keys (one of them bound to a user), in front of the scratch stack's
Triton and Milvus (the stack the request fuzzer writes to, so nothing here disturbs the
catalogue other tests assert on; no extra Triton or Milvus is started)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from recsys_client import (
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RecommenderClient,
    Tls,
    UnauthenticatedError,
    UnavailableError,
    pb,
)

from ops.processes import free_port, gateway_process
from ops.stack import LocalStack
from services.reliability.auth import hash_key
from services.reliability.tls import channel_credentials
from tests.services.reliability.certs import Pki, make_pki

pytestmark = pytest.mark.integration
RUN = uuid.uuid4().hex[:8]
USER = f"client-it-{RUN}"
KEYS = {
    hash_key("it-admin"): {"client": "it-admin", "scopes": ["admin"]},
    hash_key("it-app"): {"client": "it-app", "scopes": ["read", "write"], "user": USER},
}


@dataclass(frozen=True)
class ProdGateway:
    target: str
    pki: Pki

    def client(self, api_key: str | None = "it-admin", **tls: Path | None) -> RecommenderClient:
        p = self.pki
        # Any: forwarded as keywords into Tls, whose fields differ in type (server_name: str)
        settings: dict[str, Any] = {
            "ca_file": p.ca,
            "cert_file": p.client_cert,
            "key_file": p.client_key,
            **tls,
        }
        return RecommenderClient(self.target, 30, api_key=api_key, tls=Tls(**settings))


@pytest.fixture(scope="module")
def prod_gateway(
    scratch_stack: LocalStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProdGateway]:
    work = tmp_path_factory.mktemp("prod-gateway")
    pki = make_pki(work)
    (work / "keys.json").write_text(json.dumps(KEYS))
    port = free_port()
    env = {
        **scratch_stack.env(),
        "RECSYS_GRPC_PORT": str(port),
        "RECSYS_METRICS_PORT": str(free_port()),
        "RECSYS_EXPOSURE_LOG": str(work / "exposures.jsonl"),
        "RECSYS_AUTH_MODE": "api_key",
        "RECSYS_API_KEYS_FILE": str(work / "keys.json"),
        "RECSYS_TLS_CERT_FILE": str(pki.server_cert),
        "RECSYS_TLS_KEY_FILE": str(pki.server_key),
        "RECSYS_TLS_CLIENT_CA_FILE": str(pki.ca),
    }
    gateway = ProdGateway(f"127.0.0.1:{port}", pki)
    proc = gateway_process(env, work, "gateway-prod.log").start()
    try:
        with gateway.client() as probe:
            proc.wait_ready(probe.serving, 90)
        yield gateway
    finally:
        proc.stop()


def _events(user: str, items: list[str]) -> list[pb.Event]:
    return [pb.Event(user_id=user, item_id=i, event_type=pb.EVENT_TYPE_CLICK) for i in items]


def test_every_rpc_over_mutual_tls_with_an_api_key(prod_gateway: ProdGateway) -> None:
    item_id = f"client-it-item-{RUN}"
    with prod_gateway.client() as client:
        item = pb.Item(item_id=item_id, title="Client Test (2031)", categories=["Drama"])
        assert client.upsert_items([item]).upserted_count == 1
        assert client.similar(item_id, k=3).items
        assert client.get_item(item_id).title == "Client Test (2031)"
        page = client.list_items(page_size=2)
        assert len(page.items) == 2 and page.next_page_token
        assert item_id in {i.item_id for i in client.iter_items(page_size=500)}
        events = _events(USER, ["1", "2"])
        first = client.ingest(events)
        assert (first.accepted_count, first.duplicate_count) == (2, 0)
        again = client.ingest(events)  # the same keys, filled by the first call
        assert (again.accepted_count, again.duplicate_count) == (0, 2)
        streamed = client.ingest_stream(iter(_events(USER, ["3", "4", "5"])), batch_size=2)
        assert streamed.accepted_count == 3
        assert client.profile(USER).history_size == 5
        reply = client.recommend(USER, k=5)
        assert len(reply.items) == 5 and not reply.degraded and reply.recommendation_id
        candidates = [s.item.item_id for s in reply.items]
        ranked = client.rank_items(USER, [*candidates, item_id])
        assert {s.item.item_id for s in ranked.items} == {*candidates, item_id}
        assert ranked.recommendation_id != reply.recommendation_id
        assert client.delete_user(USER).existed
        with pytest.raises(NotFoundError):
            client.profile(USER)
        with pytest.raises(InvalidArgumentError) as err:
            client.recommend("bad id\n")
        assert "user_id" in err.value.message
        assert (err.value.reason, err.value.domain) == ("MALFORMED_ID", "recsys.v1")
        assert [f for f, _ in err.value.field_violations] == ["user_id"]
        assert client.delete_item(item_id).existed
        with pytest.raises(NotFoundError) as gone:
            client.get_item(item_id)
        assert gone.value.reason == "ITEM_NOT_FOUND"


def test_credentials_are_enforced(prod_gateway: ProdGateway) -> None:
    with prod_gateway.client(api_key=None) as client, pytest.raises(UnauthenticatedError) as e:
        client.recommend("1")
    assert (e.value.reason, e.value.domain) == ("API_KEY_MISSING", "recsys.v1")
    with prod_gateway.client(api_key="nope") as client, pytest.raises(UnauthenticatedError) as e:
        client.recommend("1")
    assert e.value.reason == "API_KEY_INVALID"
    no_cert = {"cert_file": None, "key_file": None}
    with prod_gateway.client(**no_cert) as client, pytest.raises(UnavailableError):
        client.recommend("1", timeout=3)
    with prod_gateway.client(api_key="it-app") as app:
        assert app.recommend(USER, k=3).items  # its own user
        with pytest.raises(PermissionDeniedError) as denied:
            app.recommend("1")
        assert denied.value.reason == "USER_MISMATCH"
        with pytest.raises(PermissionDeniedError):
            app.rank_items("1", ["1", "2"])
        with pytest.raises(PermissionDeniedError) as scope:
            app.delete_item("1")  # admin only
        assert scope.value.reason == "SCOPE_MISSING"
        with pytest.raises(PermissionDeniedError):
            app.ingest(_events("1", ["1"]))
        with pytest.raises(PermissionDeniedError) as streamed:  # checked on the stream too
            app.ingest_stream(iter(_events(USER, ["1"]) + _events("1", ["2"])), batch_size=1)
        assert streamed.value.reason == "USER_MISMATCH"


def test_cli_with_flags_and_environment(prod_gateway: ProdGateway) -> None:
    pki = prod_gateway.pki
    env = {
        **os.environ,
        "RECSYS_TARGET": prod_gateway.target,
        "RECSYS_API_KEY": "it-admin",
        "RECSYS_TIMEOUT": "30",
    }
    tls = ["--tls", "--ca", str(pki.ca), "--cert", str(pki.client_cert)]
    tls += ["--key", str(pki.client_key)]
    cli = [sys.executable, "-m", "recsys_client.cli", *tls]
    out = subprocess.run(
        [*cli, "recommend", "--user", "1", "-k", "3"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("recommendations for user 1") and "  3. " in out.stdout
    denied = subprocess.run(
        [*cli, "--api-key", "it-app", "profile", "--user", "1"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert denied.returncode == 1 and "PERMISSION_DENIED [USER_MISMATCH]" in denied.stderr


def test_reflection_lists_the_api_without_a_key(prod_gateway: ProdGateway) -> None:
    """What `grpcurl list` (README, for other languages) relies on: reflection over mutual
    TLS, exempt from API keys."""
    pki = prod_gateway.pki
    creds = channel_credentials(pki.ca, pki.client_cert, pki.client_key)
    with grpc.secure_channel(prod_gateway.target, creds) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = stub.ServerReflectionInfo(iter([request]), timeout=10)
    names = {s.name for s in reply.list_services_response.service}
    assert {"recsys.v1.RecommenderService", "grpc.health.v1.Health"} <= names
