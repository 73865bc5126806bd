"""What each of several gateway processes runs with (no stack needed)."""

from __future__ import annotations

from pydantic import SecretStr

from core.config import Settings
from services.gateway.processes import child_settings


def test_a_gateway_process_serves_no_metrics_of_its_own_and_keeps_the_event_log_key() -> None:
    """The supervisor serves the processes' metrics; the pseudonym key also names each
    user's event-log subjects, so a process must not draw its own (its ingests and reads
    would miss the profile workers' subjects)."""
    for key in ("", "shared-key"):
        given = Settings(gateway_processes=2, metrics_port=9464, pseudonym_key=SecretStr(key))
        child = child_settings(given)
        assert child.metrics_port == 0
        assert child.pseudonym_key.get_secret_value() == key
        assert child.grpc_port == given.grpc_port
