"""Exposures and A/B feedback on the JetStream exposures stream, with a real nats-server:
the gateway's writer, the report reading the stream and joining clicks by recommendation id,
a retried exposure stored once, and DeleteUser's ``forget_user`` purging the user's records."""

from __future__ import annotations

import json

import pytest

from core.config import Settings, get_settings
from services.events.log import BlockingEventLog, EventLog
from services.experiments.exposures import read_stream, stream_records
from services.experiments.report import main, summarise
from services.experiments.runtime import ExperimentService
from tests.nats_server import nats_settings, on_log

__all__ = ["nats_settings"]
pytestmark = pytest.mark.integration

EXPERIMENTS = json.dumps(
    [
        {
            "name": "mix",
            "salt": "stream-test",
            "arms": [
                {"name": "control", "weight": 50, "variant": {"mmr_lambda": 0.0}},
                {"name": "treatment", "weight": 50, "variant": {"mmr_lambda": 0.5}},
            ],
        }
    ]
)


def _service(settings: Settings) -> tuple[ExperimentService, BlockingEventLog]:
    events = BlockingEventLog(settings, "test-gateway")
    svc = ExperimentService.from_settings(
        settings.model_copy(update={"experiments": EXPERIMENTS}), events
    )
    return svc, events


def test_stream_is_the_report_source_and_joins_by_recommendation_id(
    nats_settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECSYS_NATS_URLS", nats_settings.nats_urls)
    get_settings.cache_clear()
    svc, events = _service(nats_settings)
    try:
        assert events.wait_connected(20)
        users = [f"user-{n}" for n in range(8)]
        for n, user in enumerate(users):
            assignments, _ = svc.for_user(user)
            svc.exposed(user, assignments, ["a", "b"], request_id=f"rec-{n}")
            svc.exposed(user, assignments, ["a", "b"], request_id=f"rec-{n}")  # a retry
            svc.exposed(user, assignments, ["a", "c"], request_id=f"later-{n}")
        # user-0 clicks "a" of its first recommendation: by id, not the latest exposure
        svc.clicked("user-0", ["a"], recommendation_id="rec-0")
        svc.clicked("user-1", ["c"])  # no id: by user and time window (the latest with c)
        assert svc.flush(10)
        records = read_stream(nats_settings)
        exposures = [r for r in records if r["type"] == "exposure"]
        assert len(exposures) == 16  # the retried publish was stored once
        summary = summarise(records)
        assert summary["joined_by_recommendation_id"] == 1
        assert summary["unattributed_clicks"] == 0
        assert sum(a.successes for a in summary["arms"]) == 2
        credited = {
            r["request_id"]
            for r in exposures
            if r["user_id"] in ("user-0", "user-1") and r["request_id"].startswith("rec-")
        }
        assert credited == {"rec-0", "rec-1"}

        assert main([]) == 0  # make ab-report: the stream by default
        out = capsys.readouterr().out
        assert "| mix |" in out and "clicks joined by recommendation id: 1" in out

        purged = events.call(lambda log: log.forget_user("user-0", 5.0), 10.0)
        assert purged == 0  # no events, only exposures: those go too
        left = on_log(nats_settings, stream_records)
        assert left and not [r for r in left if r["user_id"] == "user-0"]
        assert len([r for r in left if r["user_id"] == "user-1"]) == 3
    finally:
        events.close()
        get_settings.cache_clear()


def test_exposures_while_the_log_is_unreachable_are_counted_not_raised() -> None:
    settings = Settings(nats_urls="nats://127.0.0.1:1", experiments=EXPERIMENTS)
    svc, events = _service(settings)
    try:
        assignments, _ = svc.for_user("u")
        svc.exposed("u", assignments, ["a"], request_id="r")  # Recommend still answers
        assert svc.log is not None and svc.log.lost == 1  # type: ignore[attr-defined]
    finally:
        events.close()


def test_stream_subject_is_pseudonymous(nats_settings: Settings) -> None:
    log = EventLog(nats_settings)
    subject = log.exposure_subject("alice@example.com")
    assert subject.startswith(nats_settings.exposures_subject + ".u")
    assert "alice" not in subject
