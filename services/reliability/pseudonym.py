"""Pseudonymous user ids for logs and metrics: a keyed hash (HMAC-SHA256).

``pseudonym("u42")`` gives ``"u~3f1c9a0b2d4e6f81"``: stable for one key, so a user's log
lines can be followed, but not reversible without ``RECSYS_PSEUDONYM_KEY`` (a Secret). With
no key set, a random one is drawn per process (lines link within a run only).
:class:`RedactUserIds` rewrites user ids that reach a log record anyway (``user_id=...``,
``user 'u42'``; a bare ``user word`` is left alone); :func:`install` puts it on every
handler of the root logger.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets

from core.config import Settings

_key: bytes = secrets.token_bytes(32)
PREFIX = "u~"
_ID = r"[A-Za-z0-9_.:\-]{1,128}"
# user_id=X, user_id: 'X', "user_id": "X" (quotes optional), and user 'X' (quotes required)
USER_PATTERNS = (
    re.compile(
        rf"""(?P<lead>\buser(?:_id|Id)?["']?\s*[=:]\s*)(?P<q>["']?)(?P<id>{_ID})(?![~\w.:\-])(?P=q)"""
    ),
    re.compile(rf"""(?P<lead>\buser\s+)(?P<q>["'])(?P<id>{_ID})(?![~\w.:\-])(?P=q)"""),
)


def configure(settings: Settings) -> None:
    """Use the configured key (or keep the per-process random one)."""
    global _key
    secret = settings.pseudonym_key.get_secret_value()
    if secret:
        _key = secret.encode()


def pseudonym(user_id: str) -> str:
    """The keyed hash of a user id, 64 bits in hex, prefixed ``u~``."""
    digest = hmac.new(_key, user_id.encode("utf-8", "replace"), hashlib.sha256).hexdigest()
    return PREFIX + digest[:16]


def redact(text: str) -> str:
    """Replace user ids that follow a ``user``/``user_id`` marker with their pseudonym."""

    def repl(m: re.Match[str]) -> str:
        uid = m.group("id")
        if uid.startswith(PREFIX):
            return m.group(0)
        return f"{m.group('lead')}{m.group('q')}{pseudonym(uid)}{m.group('q')}"

    for pattern in USER_PATTERNS:
        text = pattern.sub(repl, text)
    return text


class RedactUserIds(logging.Filter):
    """A handler filter: the formatted message and exception text lose raw user ids."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install(settings: Settings) -> None:
    """Configure the key and filter every root handler (call after logging is set up)."""
    configure(settings)
    root = logging.getLogger()
    for handler in root.handlers:
        if not any(isinstance(f, RedactUserIds) for f in handler.filters):
            handler.addFilter(RedactUserIds())
