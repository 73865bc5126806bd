"""Certificates and API keys rotated on disk take effect without a restart; a broken
rotation keeps the previous ones serving."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import grpc

from core.config import Settings
from services.api import pb, pb_grpc
from services.reliability.auth import RELOAD_CHECK_S, ReloadingKeyStore, hash_key
from services.reliability.tls import (
    SETTLE_S,
    CertificateFiles,
    channel_credentials,
    server_credentials,
)
from tests.services.reliability.certs import make_pki
from tests.services.reliability.conftest import running_server

Code = grpc.StatusCode


def _recommend(target: str, creds: grpc.ChannelCredentials, key: str = "") -> object:
    metadata = (("x-api-key", key),) if key else ()
    with grpc.secure_channel(target, creds) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        try:
            return stub.Recommend(pb.RecommendRequest(user_id="u"), timeout=3, metadata=metadata)
        except grpc.RpcError as err:
            return err.code()  # type: ignore[attr-defined]


def test_rotated_certificates_serve_new_connections(tmp_path: Path) -> None:
    for name in ("old", "new", "live"):
        (tmp_path / name).mkdir()
    old, new = make_pki(tmp_path / "old"), make_pki(tmp_path / "new")
    live = tmp_path / "live"
    for src, name in ((old.server_cert, "tls.crt"), (old.server_key, "tls.key"), (old.ca, "ca")):
        shutil.copy(src, live / name)
    settings = Settings(
        tls_cert_file=live / "tls.crt",
        tls_key_file=live / "tls.key",
        tls_client_ca_file=live / "ca",
    )
    old_client = channel_credentials(old.ca, old.client_cert, old.client_key)
    new_client = channel_credentials(new.ca, new.client_cert, new.client_key)
    with running_server(settings, credentials=server_credentials(settings)) as (target, _):
        assert isinstance(_recommend(target, old_client), pb.RecommendResponse)
        assert _recommend(target, new_client) == Code.UNAVAILABLE
        for src, name in ((new.server_cert, "tls.crt"), (new.server_key, "tls.key")):
            shutil.copy(src, live / name)
        shutil.copy(new.ca, live / "ca")
        time.sleep(SETTLE_S + 0.2)
        assert isinstance(_recommend(target, new_client), pb.RecommendResponse)
        assert _recommend(target, old_client) == Code.UNAVAILABLE
        (live / "tls.key").write_text("garbage")  # a broken rotation...
        time.sleep(SETTLE_S + 0.2)
        assert isinstance(_recommend(target, new_client), pb.RecommendResponse)  # ...is ignored


def test_certificate_files_wait_until_written(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    now = [time.time() + 100.0]
    files = CertificateFiles(
        pki.server_cert, pki.server_key, None, settle_s=1.0, clock=lambda: now[0]
    )
    assert files.fetch() is None  # unchanged
    pki.server_cert.write_bytes(pki.server_cert.read_bytes())
    now[0] = time.time() + 0.5  # changed half a second ago: maybe mid-copy
    assert files.fetch() is None
    now[0] = time.time() + 2.0
    assert files.fetch() is not None and files.reloads == 1
    assert files.fetch() is None


def test_key_file_is_reloaded(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({hash_key("first"): {"client": "a", "scopes": ["read"]}}))
    now = [0.0]
    settings = Settings(auth_mode="api_key", api_keys_file=keys)
    store = ReloadingKeyStore(settings, check_s=1.0, clock=lambda: now[0])
    assert store.lookup("first") is not None and store.lookup("second") is None
    keys.write_text(json.dumps({hash_key("second"): {"client": "b", "scopes": ["read"]}}))
    assert store.lookup("second") is None  # not looked at again within check_s
    now[0] = 1.5
    principal = store.lookup("second")
    assert principal is not None and principal.client == "b" and store.reloads == 1
    assert store.lookup("first") is None  # revoked
    keys.write_text("{not json")  # a broken edit keeps the keys in force
    now[0] = 3.0
    assert store.lookup("second") is not None and store.reloads == 1
    keys.write_text("{}")  # so does emptying the file
    now[0] = 4.5
    assert store.lookup("second") is not None


def test_rotated_key_through_the_server(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({hash_key("k1"): {"client": "a", "scopes": ["read"]}}))
    settings = Settings(
        auth_mode="api_key",
        api_keys_file=keys,
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
    )
    creds = channel_credentials(pki.ca)
    with running_server(settings, credentials=server_credentials(settings)) as (target, _):
        assert isinstance(_recommend(target, creds, "k1"), pb.RecommendResponse)
        assert _recommend(target, creds, "k2") == Code.UNAUTHENTICATED
        keys.write_text(json.dumps({hash_key("k2"): {"client": "b", "scopes": ["read"]}}))
        time.sleep(RELOAD_CHECK_S + 0.2)
        assert isinstance(_recommend(target, creds, "k2"), pb.RecommendResponse)
        assert _recommend(target, creds, "k1") == Code.UNAUTHENTICATED
