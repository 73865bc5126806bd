"""Who is calling, and may they: API keys / bearer tokens checked by a server interceptor.

``RECSYS_AUTH_MODE=api_key`` requires ``authorization: Bearer <key>`` or ``x-api-key: <key>``
on every call except health and reflection. Keys come from ``RECSYS_API_KEYS`` and/or the
file ``RECSYS_API_KEYS_FILE`` (a mounted Kubernetes Secret), both JSON::

    {"sha256:<hex digest of the key>": {"client": "web", "scopes": ["read"]},
     "<plain key, hashed on load>": {"client": "etl", "scopes": ["write"], "rate_limit_rps": 5},
     "sha256:<...>": {"client": "app-42", "scopes": ["read", "write"], "user": "42"}}

Only SHA-256 digests are kept in memory; a presented key is hashed and compared with every
entry in constant time (:func:`hmac.compare_digest`). ``hash_key("...")`` gives the
``sha256:`` form to store. Scopes: ``read`` (Recommend, SimilarItems, GetUserProfile,
GetItem, ListItems, RankItems), ``write`` (IngestEvents, StreamIngestEvents), ``admin``
(DeleteUser, UpsertItems, DeleteItem, and every method not listed; admin implies the other
two). No or an unknown key is ``UNAUTHENTICATED``;
a known key without the method's scope is ``PERMISSION_DENIED``. A key with a ``user`` is
bound to that user (per-user authorization, e.g. a key handed to one app install): it may
only name that user in a request (:mod:`services.reliability.user_binding`).

The key file is watched (:class:`services.watched_file.WatchedFile`): a changed file
(modification time, size or inode; checked at most every ``RELOAD_CHECK_S``) is re-read
without a restart, and a file that does not parse keeps the previous keys in service, with an
error in the log.

``RECSYS_AUTH_MODE=none`` (the local default) admits every call, with a WARNING at start;
the caller is then identified by its TLS client certificate's common name, else its address,
which is what per-client rate limiting uses. The admitted :class:`Principal` is available to
later interceptors and to the servicer through :func:`current_principal`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc

from core.config import Settings
from services.reliability.guard import GuardInterceptor, abort, metadata_value
from services.watched_file import RELOAD_CHECK_S, WatchedFile

log = logging.getLogger(__name__)

READ, WRITE, ADMIN = "read", "write", "admin"
SCOPES = frozenset({READ, WRITE, ADMIN})
_SERVICE = "/recsys.v1.RecommenderService/"
METHOD_SCOPES: dict[str, str] = {
    _SERVICE + "Recommend": READ,
    _SERVICE + "SimilarItems": READ,
    _SERVICE + "GetUserProfile": READ,
    _SERVICE + "GetItem": READ,
    _SERVICE + "ListItems": READ,
    _SERVICE + "RankItems": READ,
    _SERVICE + "IngestEvents": WRITE,
    _SERVICE + "StreamIngestEvents": WRITE,
    _SERVICE + "DeleteUser": ADMIN,
    _SERVICE + "UpsertItems": ADMIN,
}


def required_scope(method: str) -> str:
    """The scope a full method name needs; unlisted methods need admin (default deny)."""
    return METHOD_SCOPES.get(method, ADMIN)


@dataclass(frozen=True)
class Principal:
    """The admitted caller: a client name, its scopes and an optional own rate limit."""

    client: str
    scopes: frozenset[str]
    rate_limit_rps: float | None = None
    authenticated: bool = False
    user: str | None = None  # a key bound to one user may only name that user

    def allows(self, scope: str) -> bool:
        return ADMIN in self.scopes or scope in self.scopes


_current: ContextVar[Principal | None] = ContextVar("recsys_principal", default=None)


def current_principal() -> Principal | None:
    """The caller of the RPC running on this thread (None outside an RPC)."""
    return _current.get()


def hash_key(key: str) -> str:
    """The ``sha256:<hex>`` form of an API key, to store instead of the key."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """API-key digests and the principal each one authenticates."""

    def __init__(self, entries: Mapping[str, Mapping[str, Any]]) -> None:
        self._keys: list[tuple[bytes, Principal]] = []
        for key, entry in entries.items():
            digest = (
                key[7:] if key.startswith("sha256:") else hashlib.sha256(key.encode()).hexdigest()
            )
            client = entry.get("client")
            scopes = entry.get("scopes", [])
            if not isinstance(client, str) or not client:
                raise ValueError("api key entry: 'client' must be a non-empty string")
            if not isinstance(scopes, list) or not set(scopes) <= SCOPES:
                raise ValueError(
                    f"api key of {client!r}: scopes must be a list from {sorted(SCOPES)}"
                )
            try:
                raw = bytes.fromhex(digest)
            except ValueError:
                raise ValueError(f"api key of {client!r}: bad sha256 hex digest") from None
            if len(raw) != 32:
                raise ValueError(f"api key of {client!r}: a sha256 digest has 64 hex digits")
            rps = entry.get("rate_limit_rps")
            user = entry.get("user")
            if user is not None and (not isinstance(user, str) or not user):
                raise ValueError(f"api key of {client!r}: 'user' must be a non-empty string")
            rate = None if rps is None else float(rps)
            self._keys.append((raw, Principal(client, frozenset(scopes), rate, True, user)))

    def __len__(self) -> int:
        return len(self._keys)

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyStore:
        entries: dict[str, Any] = {}
        sources = [("RECSYS_API_KEYS", settings.api_keys.get_secret_value())]
        if settings.api_keys_file is not None:
            sources.append((str(settings.api_keys_file), settings.api_keys_file.read_text()))
        for name, text in sources:
            if not text.strip():
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{name}: not valid JSON ({exc.msg})") from None
            if not isinstance(data, dict):
                raise ValueError(f"{name}: expected a JSON object of key -> entry")
            entries.update(data)
        return cls(entries)

    def current(self) -> KeyStore:
        return self

    def lookup(self, key: str) -> Principal | None:
        """The principal of ``key``; every entry is compared, so timing reveals nothing."""
        digest = hashlib.sha256(key.encode("utf-8", "replace")).digest()
        found = None
        for stored, principal in self._keys:
            if hmac.compare_digest(stored, digest):
                found = principal
        return found


class ReloadingKeyStore(WatchedFile[KeyStore]):
    """The settings' keys, re-read when ``api_keys_file`` changes on disk (a file that does
    not parse, or that holds no key at all, keeps the keys in force)."""

    def __init__(
        self,
        settings: Settings,
        check_s: float = RELOAD_CHECK_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        super().__init__(
            settings.api_keys_file,
            lambda: KeyStore.from_settings(settings),
            "API key file",
            refuse=lambda store: None if store else "no keys at all",
            check_s=check_s,
            clock=clock,
        )

    def __len__(self) -> int:
        return len(self.current())

    def lookup(self, key: str) -> Principal | None:
        return self.current().lookup(key)


def presented_key(context: grpc.ServicerContext) -> str | None:
    """The key from ``authorization: Bearer <key>`` or ``x-api-key``, if any."""
    header = metadata_value(context, "authorization")
    if header is not None:
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    key = metadata_value(context, "x-api-key")
    return key.strip() if key and key.strip() else None


def peer_name(context: grpc.ServicerContext) -> str:
    """A TLS client certificate's common name, else the peer's host (no port)."""
    with contextlib.suppress(Exception):
        names = (context.auth_context() or {}).get("x509_common_name")
        if names:
            return "cn:" + names[0].decode("utf-8", "replace")
    peer = context.peer() or "unknown"
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


class AuthInterceptor(GuardInterceptor):
    """Admits a call (setting :func:`current_principal`) or aborts with the right code."""

    def __init__(self, mode: str, keys: KeyStore | ReloadingKeyStore | None = None) -> None:
        if mode not in ("none", "api_key"):
            raise ValueError(f"auth mode {mode!r}: use 'none' or 'api_key'")
        if mode == "api_key" and not keys:
            raise ValueError("auth mode api_key needs RECSYS_API_KEYS or RECSYS_API_KEYS_FILE")
        self.mode = mode
        self.keys: KeyStore | ReloadingKeyStore = keys or KeyStore({})

    @classmethod
    def from_settings(cls, settings: Settings) -> AuthInterceptor:
        if settings.auth_mode == "none":
            log.warning(
                "AUTHENTICATION IS OFF (RECSYS_AUTH_MODE=none): every caller may read, ingest, "
                "upsert items and delete users. Set RECSYS_AUTH_MODE=api_key outside a laptop."
            )
            return cls("none")
        keys = ReloadingKeyStore(settings)
        log.info("API-key authentication on: %d key(s)", len(keys))
        return cls("api_key", keys)

    def _admit(self, method: str, context: grpc.ServicerContext) -> Principal:
        if self.mode == "none":
            return Principal(peer_name(context), SCOPES)
        key = presented_key(context)
        if key is None:
            abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "missing credentials: send 'authorization: Bearer <api key>' or 'x-api-key'",
                reason="API_KEY_MISSING",
            )
        principal = self.keys.lookup(key)
        if principal is None:
            code = grpc.StatusCode.UNAUTHENTICATED
            abort(context, code, "invalid API key", reason="API_KEY_INVALID")
        scope = required_scope(method)
        if not principal.allows(scope):
            abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"client {principal.client!r} lacks the {scope!r} scope that "
                f"{method.rsplit('/', 1)[-1]} needs",
                reason="SCOPE_MISSING",
            )
        return principal

    @contextlib.contextmanager
    def _scope(self, principal: Principal) -> Iterator[None]:
        token = _current.set(principal)
        try:
            yield
        finally:
            _current.reset(token)

    def guard(
        self, method: str, context: grpc.ServicerContext
    ) -> contextlib.AbstractContextManager[None]:
        return self._scope(self._admit(method, context))
