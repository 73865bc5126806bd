"""API keys and scopes through a real gRPC server: codes, exemptions, the admitted client."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeAlias

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core.config import Settings
from services.api import pb, pb_grpc
from services.reliability.auth import (
    AuthInterceptor,
    KeyStore,
    hash_key,
    required_scope,
)
from tests.services.reliability.conftest import running_server

KEYS = {
    hash_key("reader-key"): {"client": "web", "scopes": ["read"]},
    hash_key("writer-key"): {"client": "etl", "scopes": ["write"]},
    "admin-key": {"client": "ops", "scopes": ["admin"]},  # plain: hashed on load
}
EVENT = pb.Event(user_id="u1", item_id="i1", event_type=pb.EVENT_TYPE_VIEW)
Code: TypeAlias = grpc.StatusCode


def _settings(base: Settings, **extra: object) -> Settings:
    update = {"auth_mode": "api_key", "api_keys": json.dumps(KEYS), **extra}
    return Settings.model_validate({**base.model_dump(), **update})


def _calls(stub: pb_grpc.RecommenderServiceStub) -> dict[str, object]:
    """One callable per RPC, each taking the call metadata."""
    return {
        "Recommend": lambda md: stub.Recommend(pb.RecommendRequest(user_id="u"), metadata=md),
        "SimilarItems": lambda md: stub.SimilarItems(pb.SimilarItemsRequest(), metadata=md),
        "GetUserProfile": lambda md: stub.GetUserProfile(pb.GetUserProfileRequest(), metadata=md),
        "IngestEvents": lambda md: stub.IngestEvents(
            pb.IngestEventsRequest(events=[EVENT]), metadata=md
        ),
        "StreamIngestEvents": lambda md: stub.StreamIngestEvents(
            iter([pb.StreamIngestEventsRequest(events=[EVENT])]), metadata=md
        ),
        "UpsertItems": lambda md: stub.UpsertItems(pb.UpsertItemsRequest(), metadata=md),
        "DeleteUser": lambda md: stub.DeleteUser(pb.DeleteUserRequest(), metadata=md),
    }


def _code(call: object, metadata: tuple[tuple[str, str], ...]) -> Code:
    try:
        call(metadata)  # type: ignore[operator]
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return Code.OK


EXPECTED = {
    # key -> RPCs it may call
    "reader-key": {"Recommend", "SimilarItems", "GetUserProfile"},
    "writer-key": {"IngestEvents", "StreamIngestEvents"},
    "admin-key": {
        "Recommend",
        "SimilarItems",
        "GetUserProfile",
        "IngestEvents",
        "StreamIngestEvents",
        "UpsertItems",
        "DeleteUser",
    },
}


def test_scopes_per_method_and_codes(base_settings: Settings) -> None:
    with (
        running_server(_settings(base_settings)) as (target, _),
        grpc.insecure_channel(target) as channel,
    ):
        calls = _calls(pb_grpc.RecommenderServiceStub(channel))
        for key, allowed in EXPECTED.items():
            for name, call in calls.items():
                want = Code.OK if name in allowed else Code.PERMISSION_DENIED
                header = (("authorization", f"Bearer {key}"),)
                assert _code(call, header) == want, (key, name)
        for name, call in calls.items():
            assert _code(call, ()) == Code.UNAUTHENTICATED, name
            assert _code(call, (("x-api-key", "wrong"),)) == Code.UNAUTHENTICATED, name
            assert _code(call, (("authorization", "Basic admin-key"),)) == Code.UNAUTHENTICATED


def test_x_api_key_header_and_client_reaches_servicer(base_settings: Settings) -> None:
    with (
        running_server(_settings(base_settings)) as (target, _),
        grpc.insecure_channel(target) as channel,
    ):
        stub = pb_grpc.RecommenderServiceStub(channel)
        reply = stub.Recommend(pb.RecommendRequest(), metadata=(("x-api-key", "reader-key"),))
        assert reply.model_version == "web"  # the fake servicer echoes current_principal()
        reply = stub.Recommend(
            pb.RecommendRequest(), metadata=(("authorization", "bearer admin-key"),)
        )
        assert reply.model_version == "ops"


def test_health_is_exempt(base_settings: Settings) -> None:
    with (
        running_server(_settings(base_settings)) as (target, _),
        grpc.insecure_channel(target) as channel,
    ):
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_auth_off_admits_everyone_and_names_the_peer(
    base_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with running_server(base_settings) as (target, _), grpc.insecure_channel(target) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        assert stub.DeleteUser(pb.DeleteUserRequest()).existed
        assert stub.Recommend(pb.RecommendRequest()).model_version == "127.0.0.1"
    assert "AUTHENTICATION IS OFF" in caplog.text


def test_keys_file_and_unknown_methods_need_admin(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({hash_key("k"): {"client": "c", "scopes": ["read", "write"]}}))
    store = KeyStore.from_settings(Settings(api_keys_file=path))
    principal = store.lookup("k")
    assert principal is not None and principal.client == "c"
    assert store.lookup("K") is None
    assert required_scope("/recsys.v1.RecommenderService/NewAdminThing") == "admin"
    assert not principal.allows(required_scope("/recsys.v1.RecommenderService/NewAdminThing"))


@pytest.mark.parametrize(
    "entries",
    [
        {"k": {"client": "", "scopes": ["read"]}},
        {"k": {"client": "c", "scopes": ["root"]}},
        {"sha256:zz": {"client": "c", "scopes": ["read"]}},
        {"sha256:abcd": {"client": "c", "scopes": ["read"]}},
    ],
)
def test_bad_key_config_fails_at_start(entries: dict[str, dict[str, object]]) -> None:
    with pytest.raises(ValueError):
        KeyStore(entries)


def test_api_key_mode_without_keys_refuses_to_start() -> None:
    with pytest.raises(ValueError, match="needs RECSYS_API_KEYS"):
        AuthInterceptor.from_settings(Settings(auth_mode="api_key"))
    with pytest.raises(ValueError, match="not valid JSON"):
        AuthInterceptor.from_settings(Settings(auth_mode="api_key", api_keys="{nope"))
