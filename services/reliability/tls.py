"""TLS and mutual TLS for the gateway, from PEM files (a Kubernetes ``tls`` Secret).

``RECSYS_TLS_CERT_FILE`` + ``RECSYS_TLS_KEY_FILE`` turn TLS on (``add_secure_port``);
``RECSYS_TLS_CLIENT_CA_FILE`` in addition requires every client to present a certificate
signed by that CA (mutual TLS), whose common name then identifies the caller when API keys
are off. Neither set = plaintext, fine on loopback only.

Rotation without restart: the credentials are ``grpc.dynamic_ssl_server_credentials``, whose
fetcher gRPC calls on every new connection. :class:`CertificateFiles` answers from the files'
stat (modification time, size, inode; a Kubernetes Secret update swaps them all at once) and
re-reads them once they changed and have been still for :data:`SETTLE_S` (so a half-copied
pair is not served). Connections already open keep their session; a file that cannot be read
keeps the previous certificates in service, with an error in the log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from core.config import Settings
from services.watched_file import file_stamp

log = logging.getLogger(__name__)


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{what} {path}: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"{what} {path}: not a PEM file")
    return data


SETTLE_S = 1.0
Stamp = tuple[tuple[int, int, int] | None, ...]


class CertificateFiles:
    """The server's certificate, key and client CA, re-read when they change on disk."""

    def __init__(
        self,
        cert: Path,
        key: Path,
        ca: Path | None,
        settle_s: float = SETTLE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.paths = (cert, key, *((ca,) if ca is not None else ()))
        self.mutual = ca is not None
        self.settle_s = settle_s
        self.clock = clock
        self.reloads = 0
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self.initial = self._load()  # bad files at start fail the start, with the path named

    def _stat(self) -> Stamp:
        return tuple(file_stamp(path) for path in self.paths)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        cert, key, *ca = self.paths
        pair = (_read(key, "TLS key"), _read(cert, "TLS certificate"))
        roots = _read(ca[0], "client CA") if ca else None
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=roots)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher (each new connection): new certificates, or None for no change."""
        stamp = self._stat()
        if stamp == self._stamp or None in stamp:
            return None
        newest = max(s[0] for s in stamp if s is not None) / 1e9
        if self.clock() - newest < self.settle_s:
            return None  # still being written: serve the old pair a little longer
        with self._lock:
            if stamp == self._stamp:
                return None
            self._stamp = stamp
            try:
                config = self._load()
            except ValueError as exc:
                log.error("TLS files changed but cannot be used, keeping the old ones: %s", exc)
                return None
            self.reloads += 1
        log.info("TLS certificates reloaded from %s", ", ".join(map(str, self.paths)))
        return config


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
    files = CertificateFiles(cert, key, ca)
    log.info(
        "TLS on%s; certificate files are watched and reloaded on change",
        " with client certificates required (mTLS)" if files.mutual else "",
    )
    return grpc.dynamic_ssl_server_credentials(
        files.initial, files.fetch, require_client_authentication=files.mutual
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
