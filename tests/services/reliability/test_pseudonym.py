"""User ids in logs become keyed hashes."""

from __future__ import annotations

import logging

import pytest

from core.config import Settings
from services.reliability import pseudonym as ps


def test_pseudonym_is_keyed_stable_and_opaque() -> None:
    ps.configure(Settings(pseudonym_key="k1"))
    a = ps.pseudonym("user-42")
    assert a == ps.pseudonym("user-42") and a.startswith("u~") and "42" not in a[2:6]
    assert a != ps.pseudonym("user-43")
    ps.configure(Settings(pseudonym_key="k2"))
    assert ps.pseudonym("user-42") != a


@pytest.mark.parametrize(
    ("text", "leaks"),
    [
        ("ingest failed for user_id=alice.b", "alice.b"),
        ("user 'alice.b' has no profile", "alice.b"),
        ('{"user_id": "alice.b", "n": 3}', "alice.b"),
        ("userId: alice.b", "alice.b"),
    ],
)
def test_redact_replaces_user_ids(text: str, leaks: str) -> None:
    out = ps.redact(text)
    assert leaks not in out and ps.pseudonym(leaks) in out


def test_redact_leaves_other_text_alone() -> None:
    text = "user vector stale; users collection ready; user_id=u~0123456789abcdef"
    assert ps.redact(text) == text


def test_log_filter_redacts_messages_and_tracebacks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("tests.pseudonym")
    caplog.handler.addFilter(ps.RedactUserIds())
    logger.warning("apply failed for user_id=%s", "bob-secret")
    try:
        raise KeyError("user 'bob-secret'")
    except KeyError:
        logger.exception("boom")
    assert "bob-secret" not in caplog.text
    assert ps.pseudonym("bob-secret") in caplog.text


def test_install_filters_root_handlers_once() -> None:
    root = logging.getLogger()
    handler = logging.NullHandler()
    root.addHandler(handler)
    try:
        ps.install(Settings())
        ps.install(Settings())
        assert sum(isinstance(f, ps.RedactUserIds) for f in handler.filters) == 1
    finally:
        root.removeHandler(handler)
