"""TLS and mutual TLS for the gateway, from PEM files (a Kubernetes ``tls`` Secret).

``RECSYS_TLS_CERT_FILE`` + ``RECSYS_TLS_KEY_FILE`` turn TLS on (``add_secure_port``);
``RECSYS_TLS_CLIENT_CA_FILE`` in addition requires every client to present a certificate
signed by that CA (mutual TLS), whose common name then identifies the caller when API keys
are off. Neither set = plaintext, fine on loopback only. Certificates are read at start:
a rotated Secret takes effect on the next rollout.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from core.config import Settings

log = logging.getLogger(__name__)


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{what} {path}: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"{what} {path}: not a PEM file")
    return data


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """Server credentials from the settings' files, or None for plaintext."""
    cert, key, ca = settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    if cert is None and key is None:
        if ca is not None:
            raise ValueError("RECSYS_TLS_CLIENT_CA_FILE needs RECSYS_TLS_CERT_FILE and _KEY_FILE")
        log.warning("TLS is off: the gateway accepts plaintext connections")
        return None
    if cert is None or key is None:
        raise ValueError("TLS needs both RECSYS_TLS_CERT_FILE and RECSYS_TLS_KEY_FILE")
    pair = (_read(key, "TLS key"), _read(cert, "TLS certificate"))
    roots = _read(ca, "client CA") if ca is not None else None
    log.info("TLS on%s", " with client certificates required (mTLS)" if roots else "")
    return grpc.ssl_server_credentials(
        [pair], root_certificates=roots, require_client_auth=roots is not None
    )


def channel_credentials(
    ca_file: Path, cert_file: Path | None = None, key_file: Path | None = None
) -> grpc.ChannelCredentials:
    """Client side: trust ``ca_file``; with a certificate and key, present them (mTLS)."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file, "CA"),
        private_key=_read(key_file, "client key") if key_file else None,
        certificate_chain=_read(cert_file, "client certificate") if cert_file else None,
    )
