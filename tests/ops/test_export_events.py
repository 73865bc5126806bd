"""The loop back to training, with a real nats-server and a local Ray: events ingested into the
stream -> ``ops.export_events`` (Ray Data, Parquet) -> the training loader reads exactly those
events, without the deleted users' and with a retried event once; the responses the gateway
logged for users in experiments go beside them, one row per response."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pandas as pd
import pytest

from core.config import Settings
from ops.export_events import decode_events, export_events, exposures_frame
from services.api import pb
from services.events.log import BlockingEventLog, EventLog, user_token
from services.experiments.assignment import Variant
from services.experiments.runtime import ExperimentService
from tests.nats_server import nats_settings, on_log
from training.config import load_config, resolve_path
from training.data import load_dataset
from training.data.exposures import load_exposures

__all__ = ["nats_settings"]
pytestmark = pytest.mark.integration
T0 = 1_700_000_000_000  # ms


def _event(user: str, item: str, kind: int, at_s: int, key: str = "", value: float = 0) -> pb.Event:
    event = pb.Event(user_id=user, item_id=item, event_type=kind, value=value, idempotency_key=key)
    event.event_time.FromMilliseconds(T0 + at_s * 1000)
    return event


def _catalogue(root: Path) -> Path:
    """A generic dataset: 6 items, and base events of two users (one to be deleted)."""
    root.mkdir()
    pd.DataFrame(
        {
            "item_id": [f"i{n}" for n in range(6)],
            "title": [f"Item {n}" for n in range(6)],
            "categories": ["A|B", "A", "B", "C", "A|C", "B"],
            "description": [f"the item number {n}" for n in range(6)],
        }
    ).to_csv(root / "items.csv", index=False)
    pd.DataFrame(
        {
            "user_id": ["base-kept", "base-kept", "base-deleted"],
            "item_id": ["i4", "i5", "i4"],
            "event_type": ["purchase", "click", "click"],
            "timestamp": [1_600_000_000, 1_600_000_100, 1_600_000_200],
        }
    ).to_csv(root / "events.csv", index=False)
    return root


def _published(settings: Settings) -> None:
    async def work(log: EventLog) -> None:
        await log.publish(
            [
                _event("alice", "i1", pb.EVENT_TYPE_CLICK, 1, "a-1"),
                _event("alice", "i2", pb.EVENT_TYPE_RATING, 2, "a-2", value=4.5),
                _event("bob", "i3", pb.EVENT_TYPE_PURCHASE, 3),
                _event("carol", "i1", pb.EVENT_TYPE_VIEW, 4, "c-1"),
            ]
        )
        await asyncio.sleep(1.2)  # past the duplicate window: JetStream stores the retry again
        await log.publish([_event("alice", "i1", pb.EVENT_TYPE_CLICK, 1, "a-1")])
        # carol is deleted: her tombstone covers what she sent so far (here written without
        # the purge, as if the export read the stream between the two: the filter must hold)
        last = (await log.js.stream_info(log.settings.events_stream)).state.last_seq
        tombstones = await log.bucket(log.settings.tombstone_bucket)
        await tombstones.put(log.token("carol"), str(last).encode())
        await tombstones.put(log.token("base-deleted"), b"1")
        # ... and she comes back afterwards: a new event of hers is hers again
        await log.publish([_event("carol", "i5", pb.EVENT_TYPE_CLICK, 5, "c-2")])

    on_log(settings, work)


def _arms(name: str) -> dict[str, object]:
    return {
        "name": name,
        "salt": f"export-{name}",
        "arms": [
            {"name": "control", "weight": 50, "variant": {}},
            {"name": "treatment", "weight": 50, "variant": {}},
        ],
    }


def _exposed(settings: Settings) -> None:
    """Two responses, as the gateway logs them: a record per experiment the user is in (two
    here), then a click on one shown item (feedback: an event, not an exposure); and a
    response to a user in no experiment where every response is logged."""
    events = BlockingEventLog(settings, "test-gateway")
    try:
        assert events.wait_connected(20)
        experiments = json.dumps([_arms("mix"), _arms("slots")])
        svc = ExperimentService.from_settings(
            settings.model_copy(update={"experiments": experiments}), events
        )
        for user, items, rec in (("alice", ["i3", "i4"], "rec-1"), ("bob", ["i1"], "rec-2")):
            assignments, _ = svc.for_user(user)
            assert len(assignments) == 2
            svc.exposed(user, assignments, items, request_id=rec)
        svc.clicked("alice", ["i3"], recommendation_id="rec-1")
        assert svc.flush(10)
        # every response logged (exposure_logging=all), here with no experiment at all
        every = ExperimentService.from_settings(
            settings.model_copy(update={"exposure_logging": "all"}), events
        )
        assert every.for_user("dave") == ([], Variant())
        every.exposed("dave", [], ["i2"], request_id="rec-3")
        assert every.flush(10)
    finally:
        events.close()


def test_events_export_to_parquet_and_train_loads_exactly_them(
    nats_settings: Settings, tmp_path: Path
) -> None:
    import ray

    settings = nats_settings.model_copy(update={"duplicate_window_s": 1.0})
    catalogue = _catalogue(tmp_path / "catalogue")
    _published(settings)
    _exposed(settings)
    out = tmp_path / "export"
    try:
        report = export_events(settings, out, items_from=catalogue, with_base=True, blocks=2)
    finally:
        ray.shutdown()
    assert (report.read, report.duplicates, report.tombstoned) == (6, 1, 2)
    assert (report.exported, report.base, report.items) == (6, 2, 6)
    assert report.exposures == 3  # five records, three responses

    # make train TRAIN_DATA=<export>: the override the Makefile passes
    cfg = load_config(None, [f"data_dir={out}"])
    events = load_dataset(resolve_path(cfg.data_dir)).events
    got = sorted(
        (u, i, t, None if pd.isna(v) else v)
        for u, i, t, v in zip(
            events["user_id"], events["item_id"], events["event_type"], events["value"], strict=True
        )
    )
    assert got == [
        ("alice", "i1", "click", None),
        ("alice", "i2", "rating", 4.5),
        ("base-kept", "i4", "purchase", None),
        ("base-kept", "i5", "click", None),
        ("bob", "i3", "purchase", None),
        ("carol", "i5", "click", None),
    ]
    alice = events[events["user_id"] == "alice"].sort_values("timestamp")
    assert [int(t.timestamp()) for t in alice["timestamp"]] == [T0 // 1000 + 1, T0 // 1000 + 2]
    # the feature ranker's stage reads the logged responses from the same directory
    exposures = load_exposures(resolve_path(cfg.data_dir))
    assert [
        (u, i, r)
        for u, i, r in zip(*(exposures[c] for c in ("user_id", "items", "request_id")), strict=True)
    ] == [
        ("alice", ["i3", "i4"], "rec-1"),
        ("bob", ["i1"], "rec-2"),
        ("dave", ["i2"], "rec-3"),
    ]
    assert str(exposures["timestamp"].dtype) == "datetime64[ns, UTC]"


def test_decoding_drops_tombstoned_and_undecodable_messages() -> None:
    good = _event("u", "i", pb.EVENT_TYPE_CLICK, 0).SerializeToString()
    token = user_token("u")
    batch = pd.DataFrame(
        {"seq": [1, 2, 3], "token": [token, token, token], "data": [good, b"\xff\xff", good]}
    )
    rows = decode_events(batch, {token: 1})
    assert list(rows["dropped"]) == ["tombstoned", "undecodable", ""]
    assert rows.iloc[2]["event_type"] == "click" and rows.iloc[2]["user_id"] == "u"


def test_exposure_records_become_one_row_per_response() -> None:
    """A response is its request id (one record per experiment the user is in), else its
    user, time and items; feedback and empty exposures are no rows."""
    record = {"type": "exposure", "user_id": "u", "ts": 20.0, "items": ["a", "b"]}
    frame = exposures_frame(
        [
            {**record, "experiment": "mix", "request_id": "r1"},
            {**record, "experiment": "slots", "request_id": "r1"},
            {**record, "ts": 10.0, "experiment": "mix"},  # an older record, no request id
            {**record, "ts": 10.0, "experiment": "slots"},
            {**record, "ts": 30.0, "items": []},
            {"type": "feedback", "user_id": "u", "ts": 21.0, "item_id": "a", "event": "click"},
        ]
    )
    assert frame["request_id"].tolist() == ["", "r1"]  # oldest first
    assert [t.timestamp() for t in frame["timestamp"]] == [10.0, 20.0]
    assert frame["items"].tolist() == [["a", "b"], ["a", "b"]]
    assert exposures_frame([]).empty
