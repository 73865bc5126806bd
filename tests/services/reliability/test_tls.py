"""TLS and mutual TLS handshakes on loopback with certificates made for the test."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from core.config import Settings
from services.api import pb, pb_grpc
from services.reliability.tls import channel_credentials, server_credentials
from tests.services.reliability.certs import Pki, make_pki
from tests.services.reliability.conftest import running_server


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _recommend(channel: grpc.Channel) -> pb.RecommendResponse:
    stub = pb_grpc.RecommenderServiceStub(channel)
    return stub.Recommend(pb.RecommendRequest(user_id="u"), timeout=5)


def _tls_settings(base: Settings, pki: Pki, mutual: bool) -> Settings:
    return base.model_copy(
        update={
            "tls_cert_file": pki.server_cert,
            "tls_key_file": pki.server_key,
            "tls_client_ca_file": pki.ca if mutual else None,
        }
    )


def test_tls_serves_trusting_clients_only(base_settings: Settings, pki: Pki) -> None:
    settings = _tls_settings(base_settings, pki, mutual=False)
    with running_server(settings, credentials=server_credentials(settings)) as (target, _):
        with grpc.secure_channel(target, channel_credentials(pki.ca)) as channel:
            assert _recommend(channel).model_version == "127.0.0.1"
        with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as err:
            _recommend(channel)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with (
            grpc.secure_channel(target, channel_credentials(pki.other_ca)) as channel,
            pytest.raises(grpc.RpcError) as err,
        ):
            _recommend(channel)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate(base_settings: Settings, pki: Pki) -> None:
    settings = _tls_settings(base_settings, pki, mutual=True)
    with running_server(settings, credentials=server_credentials(settings)) as (target, _):
        creds = channel_credentials(pki.ca, pki.client_cert, pki.client_key)
        with grpc.secure_channel(target, creds) as channel:
            # with auth off, the certificate's common name identifies the caller
            assert _recommend(channel).model_version == "cn:batch-client"
        with (
            grpc.secure_channel(target, channel_credentials(pki.ca)) as channel,
            pytest.raises(grpc.RpcError) as err,
        ):
            _recommend(channel)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_settings_are_checked(tmp_path: Path, pki: Pki) -> None:
    assert server_credentials(Settings()) is None
    with pytest.raises(ValueError, match="both"):
        server_credentials(Settings(tls_cert_file=pki.server_cert))
    with pytest.raises(ValueError, match="needs"):
        server_credentials(Settings(tls_client_ca_file=pki.ca))
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match="not a PEM"):
        server_credentials(
            Settings(tls_cert_file=tmp_path / "junk.pem", tls_key_file=pki.server_key)
        )
    with pytest.raises(ValueError, match="No such file"):
        server_credentials(
            Settings(tls_cert_file=tmp_path / "missing.pem", tls_key_file=pki.server_key)
        )
