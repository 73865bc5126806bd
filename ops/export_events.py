"""Export the events stream to Parquet in the generic events format: the loop back to training.

``python -m ops.export_events --out var/exports/events`` (``make export-events``) writes a
dataset directory that ``make train TRAIN_DATA=var/exports/events`` trains on:

* ``events.parquet/`` - the ingested events (Ray Data part files), columns ``user_id,
  item_id, event_type, timestamp, value`` of :mod:`training.data.generic`, from every event
  the ``events_stream`` holds (``RECSYS_EVENTS_MAX_AGE_S`` decides how far back that goes),
  optionally with the catalogue dataset's own events (``--with-base``);
* ``items.parquet`` - the catalogue's items (``item_id, title, categories, text,
  created_at``) from ``--items-from`` (default ``RECSYS_DATA_DIR``): events carry item ids
  only, and the loader keeps events of known items;
* ``exposures.parquet`` - the responses the gateway logged (for users in A/B experiments,
  or all of them with ``RECSYS_EXPOSURE_LOGGING=all``; ``user_id, timestamp, items,
  request_id``, one row per response) from the exposures stream, or from a JSONL exposure
  log (``--exposure-log``, the ``file`` sink), when there are any: the feature ranker
  trains on them too (:mod:`training.data.exposures`).

Honoured on the way: tombstones (an event at or below a deleted user's tombstone sequence is
never exported, nor a base event of a deleted user), and idempotency (a message id seen twice,
e.g. a retry after the duplicate window, is exported once; events without one are distinct).

The driver reads the stream (one ephemeral consumer, bounded by the last sequence when the
export starts: a consistent snapshot of a live stream) and de-duplicates; decoding, the
tombstone filter and the Parquet write run as Ray Data tasks, locally or on a cluster
(``ray job submit -- python -m ops.export_events``; ``--out`` must then be shared storage).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import math
import shutil
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from core.config import Settings, get_settings
from services.api import pb
from services.events.log import EventLog
from services.events.scan import Tombstones, scan_stream, subject_token, with_log
from services.experiments.exposures import read_log, stream_records
from services.profiles.profiles import EVENT_NAMES
from training.data.exposures import COLUMNS as EXPOSURE_COLUMNS
from training.data.exposures import EXPOSURES_FILE, empty_exposures

log = logging.getLogger(__name__)
EVENT_COLUMNS = ["user_id", "item_id", "event_type", "timestamp", "value"]
ITEM_COLUMNS = ["item_id", "title", "categories", "text", "created_at"]
EVENTS_DIR, ITEMS_FILE = "events.parquet", "items.parquet"
EVENT_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("event_type", pa.string()),
        ("timestamp", pa.timestamp("ms", tz="UTC")),
        ("value", pa.float64()),
    ]
)


@dataclass
class ExportReport:
    """What one export read, dropped and wrote."""

    read: int = 0  # messages on the stream at the snapshot
    duplicates: int = 0  # same message id as an earlier one
    tombstoned: int = 0  # deleted users' events (stream and base)
    undecodable: int = 0  # not an Event (never expected: the gateway validates)
    base: int = 0  # base dataset events added (--with-base)
    exported: int = 0  # events written
    exposures: int = 0  # logged responses written
    items: int = 0
    users: int = 0
    out: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def read_messages(log: EventLog) -> tuple[pd.DataFrame, Tombstones, int]:
    """The stream's messages (``seq, token, data``) de-duplicated by message id, the
    tombstones (read *after* the messages, so a deletion during the read still counts), and
    the number of duplicates dropped."""
    s = log.settings
    seqs: list[int] = []
    tokens: list[str] = []
    payloads: list[bytes] = []
    seen: set[str] = set()
    duplicates = 0
    async for batch in scan_stream(log, s.events_stream, f"{s.events_subject}.*"):
        for msg in batch:
            if msg.msg_id:
                if msg.msg_id in seen:
                    duplicates += 1
                    continue
                seen.add(msg.msg_id)
            seqs.append(msg.seq)
            tokens.append(subject_token(msg.subject))
            payloads.append(msg.data)
    tombstones = await Tombstones.read(log)
    frame = pd.DataFrame({"seq": seqs, "token": tokens, "data": payloads})
    return frame, tombstones, duplicates


def decode_events(batch: pd.DataFrame, tombstones: Mapping[str, int]) -> pd.DataFrame:
    """Ray Data batch function: stream messages -> generic event rows, without the events
    of deleted users (``seq <= tombstone``) and without undecodable payloads (``dropped``
    column: ``tombstoned`` / ``undecodable`` rows are counted, then filtered)."""
    rows: dict[str, list[Any]] = {c: [] for c in [*EVENT_COLUMNS, "dropped"]}
    for seq, token, data in zip(batch["seq"], batch["token"], batch["data"], strict=True):
        dropped, event = "", pb.Event()
        if int(seq) <= tombstones.get(str(token), 0):
            dropped = "tombstoned"
        else:
            try:
                event.ParseFromString(bytes(data))
            except Exception:  # protobuf's DecodeError: a payload that is not an Event
                dropped = "undecodable"
            if not dropped and event.event_type not in EVENT_NAMES:
                dropped = "undecodable"
        rows["user_id"].append(event.user_id)
        rows["item_id"].append(event.item_id)
        rows["event_type"].append(EVENT_NAMES.get(event.event_type, ""))
        rows["timestamp"].append(event.event_time.ToMilliseconds())
        rating = event.event_type == pb.EVENT_TYPE_RATING
        rows["value"].append(float(event.value) if rating else math.nan)
        rows["dropped"].append(dropped)
    out = pd.DataFrame(rows)
    out["timestamp"] = pd.to_datetime(out["timestamp"], unit="ms", utc=True)
    return out


def exposures_frame(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per response (:data:`training.data.exposures.COLUMNS`) from exposure records,
    oldest first. The gateway writes one record per experiment the user is in, so a response
    is found by its request id (else by user, time and items) and kept once; feedback
    records are left out (a click is an event, and the events are exported)."""
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    for rec in records:
        if rec.get("type") != "exposure" or not rec.get("items"):
            continue
        items = [str(i) for i in rec["items"]]
        request = str(rec.get("request_id") or "")
        key = (request,) if request else (rec.get("user_id"), rec.get("ts"), tuple(items))
        rows.setdefault(
            key,
            {
                "user_id": str(rec.get("user_id", "")),
                "timestamp": float(rec.get("ts", 0.0)),
                "items": items,
                "request_id": request,
            },
        )
    if not rows:
        return empty_exposures()
    frame = pd.DataFrame(list(rows.values()), columns=EXPOSURE_COLUMNS)
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], unit="s", utc=True)
    return frame.sort_values("timestamp", kind="stable").reset_index(drop=True)


def read_exposures(settings: Settings, exposure_log: Path | None = None) -> pd.DataFrame:
    """The logged responses of the exposures stream, or of ``exposure_log`` (a JSONL log of
    the ``file`` sink) when given."""
    if exposure_log is not None:
        return exposures_frame(read_log(exposure_log))
    return exposures_frame(asyncio.run(with_log(settings, stream_records, "recsys-export")))


def _typed(batch: pd.DataFrame) -> pa.Table:
    """One schema for every part file (a block of NaN values would otherwise be ``null``),
    without pandas metadata: Ray may hand a batch with pyarrow-backed columns, and the
    metadata would bring those dtypes back on reading (a ``timestamp[..][pyarrow]`` column
    that the training loader cannot parse), so a reader gets the plain Arrow types instead."""
    table = pa.Table.from_pandas(batch[EVENT_COLUMNS], schema=EVENT_SCHEMA, preserve_index=False)
    return table.replace_schema_metadata(None)


def _kept(batch: pd.DataFrame) -> pd.DataFrame:
    return batch[batch["dropped"] == ""][EVENT_COLUMNS]


def base_events(data_dir: Path, tombstones: Tombstones) -> tuple[pd.DataFrame, int]:
    """The catalogue dataset's own events in the generic columns, deleted users left out;
    returns them and how many were left out."""
    from training.data import load_dataset

    events = load_dataset(data_dir).events
    keep = ~events["user_id"].astype(str).map(tombstones.deleted)
    frame = pd.DataFrame(
        {
            "user_id": events["user_id"].astype(str),
            "item_id": events["item_id"].astype(str),
            "event_type": events["event_type"].astype(str),
            "timestamp": pd.to_datetime(events["timestamp"], utc=True),
            "value": events["value"].astype(float),
        }
    )[keep.to_numpy()]
    return frame.reset_index(drop=True), int((~keep).sum())


def write_items(data_dir: Path, out: Path) -> int:
    """The catalogue's items as a generic ``items.parquet`` (title, categories, text)."""
    from training.data import load_dataset

    items = load_dataset(data_dir).items
    frame = pd.DataFrame(
        {
            "item_id": items["item_id"].astype(str),
            "title": items["title"].astype(str),
            "categories": [list(map(str, c)) for c in items["categories"]],
            "text": items["text"].astype(str),
        }
    )
    if "created_at" in items:
        frame["created_at"] = items["created_at"]
    frame.to_parquet(out / ITEMS_FILE, index=False)
    return len(frame)


def export_events(
    settings: Settings,
    out: Path,
    *,
    items_from: Path | None = None,
    with_base: bool = False,
    blocks: int = 4,
    exposure_log: Path | None = None,
) -> ExportReport:
    """Write ``out/events.parquet/``, ``out/items.parquet`` and, where responses were
    logged, ``out/exposures.parquet`` (see module doc); ``out`` is replaced as a whole.
    Raises :class:`services.events.log.EventLogUnavailable` when the log cannot be read (no
    export is better than one blind to deletions)."""
    import ray

    from training.ray_cluster import connect

    frame, tombstones, duplicates = asyncio.run(with_log(settings, read_messages, "recsys-export"))
    report = ExportReport(read=len(frame) + duplicates, duplicates=duplicates, out=str(out))
    connect(num_cpus=2, include_dashboard=False, log_to_driver=False)
    parts: list[ray.data.Dataset] = []
    if len(frame):
        decoded = (
            ray.data.from_pandas(frame)
            .repartition(max(1, blocks))
            .map_batches(
                functools.partial(decode_events, tombstones=dict(tombstones.seqs)),
                batch_format="pandas",
            )
            .materialize()
        )
        counts = {r["dropped"]: r["count()"] for r in decoded.groupby("dropped").count().take_all()}
        report.tombstoned = int(counts.get("tombstoned", 0))
        report.undecodable = int(counts.get("undecodable", 0))
        parts.append(decoded.map_batches(_kept, batch_format="pandas"))
    if with_base:
        base, left_out = base_events(items_from or settings.data_dir, tombstones)
        report.base, report.tombstoned = len(base), report.tombstoned + left_out
        parts.append(ray.data.from_pandas(base))
    events = parts[0].union(*parts[1:]).materialize() if parts else None
    report.exported = events.count() if events is not None else 0
    if events is None or not report.exported:
        raise ValueError("no events to export: the stream holds none (and no --with-base)")
    report.users = len(events.unique("user_id"))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    events.map_batches(_typed, batch_format="pandas").write_parquet(str(tmp / EVENTS_DIR))
    report.items = write_items(items_from or settings.data_dir, tmp)
    exposures = read_exposures(settings, exposure_log)  # read after the events and tombstones
    if len(exposures):
        exposures.to_parquet(tmp / EXPOSURES_FILE, index=False)
    report.exposures = len(exposures)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # a reader sees the old export or the new one, never half of one
    log.info("exported %s", report.to_dict())
    return report


def main(argv: list[str] | None = None) -> int:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m ops.export_events", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("var/exports/events"))
    parser.add_argument(
        "--items-from", type=Path, default=None, help="catalogue dataset (RECSYS_DATA_DIR)"
    )
    parser.add_argument(
        "--with-base", action="store_true", help="add the catalogue dataset's own events"
    )
    parser.add_argument("--blocks", type=int, default=4, help="Ray Data blocks")
    parser.add_argument(
        "--exposure-log",
        type=Path,
        default=None,
        help="read logged responses from this JSONL log (the file sink), not the stream",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=settings.log_level)
    report = export_events(
        settings,
        args.out,
        items_from=args.items_from,
        with_base=args.with_base,
        blocks=args.blocks,
        exposure_log=args.exposure_log,
    )
    print(json.dumps(report.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
