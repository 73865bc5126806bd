"""Exposures and A/B feedback, with the arm on every record: on the JetStream exposures
stream (:class:`ExposureStream`, what the gateway writes: every replica's records in one
place, the A/B report's source) or in an append-only JSONL file (:class:`ExposureLog`, for
``make ab-replay``, exports and a gateway with ``RECSYS_EXPOSURE_SINK=file``).

Stream: subject ``<exposures_subject>.<user token>`` (one per pseudonymised user, purged by
``DeleteUser`` with the user's events); one message per call, a JSON list of records. A
Recommend response's exposures carry its recommendation id as message id, so a retried
publish is stored once. Publishing does not hold up the RPC: a record the log does not
acknowledge (NATS down) is logged and counted in ``lost``, the response is still served.

File: one JSON object per line keeps appends cheap and a torn last line (crash mid-write)
loses only that line - readers skip it.

Records (``ts`` is Unix seconds)::

    {"type": "exposure", "ts": 1.7e9, "experiment": "mmr", "arm": "treatment",
     "user_id": "42", "items": ["1", "2"], "request_id": "...",
     "surface": "home", "device": "ios"}
    {"type": "feedback", "ts": 1.7e9, "experiment": "mmr", "arm": "treatment",
     "user_id": "42", "item_id": "2", "event": "click", "recommendation_id": "..."}

(``recommendation_id``: the ``request_id`` of the exposure the click answers, when the
client sent it; the report then joins on it, else by user and time window. ``surface`` and
``device``: the request's ``RequestContext`` ids, present when it sent them; the report
breaks results down by surface.)

Thread-safe within a process (one lock per file path, shared by every ``ExposureLog`` on
that path); a single gateway process is expected to write a given file. ``delete_user``
rewrites the file without the user's records and atomically replaces it (erasure requests).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from core.config import Settings
from services.events.log import MSG_ID, BlockingEventLog, EventLog
from services.events.scan import scan_stream, with_log
from services.experiments.assignment import Assignment

log = logging.getLogger(__name__)

_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock_for(path: Path) -> threading.Lock:
    key = str(path.resolve())
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(key, threading.Lock())


class ExposureLog:
    """Writer (and reader) of one JSONL exposure/feedback file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _lock_for(self.path)

    # --- writing -------------------------------------------------------------------------
    def _append(self, records: Sequence[dict[str, Any]]) -> None:
        if not records:
            return
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.write(data)
            f.flush()

    def exposure(
        self,
        experiment: str,
        arm: str,
        user_id: str,
        items: Sequence[str],
        *,
        ts: float | None = None,
        request_id: str | None = None,
    ) -> None:
        """Record that ``user_id`` (in ``arm`` of ``experiment``) was shown ``items``."""
        rec: dict[str, Any] = {
            "type": "exposure",
            "ts": time.time() if ts is None else float(ts),
            "experiment": experiment,
            "arm": arm,
            "user_id": user_id,
            "items": [str(i) for i in items],
        }
        if request_id:
            rec["request_id"] = request_id
        self._append([rec])

    def feedback(
        self,
        experiment: str,
        arm: str,
        user_id: str,
        item_id: str,
        *,
        event: str = "click",
        ts: float | None = None,
    ) -> None:
        """Record feedback (a click by default) on ``item_id``."""
        self._append([_feedback(experiment, arm, user_id, item_id, event, ts)])

    def record_exposures(
        self,
        user_id: str,
        assignments: Sequence[Assignment],
        items: Sequence[str],
        *,
        ts: float | None = None,
        request_id: str | None = None,
        surface: str = "",
        device: str = "",
    ) -> None:
        """One exposure per experiment the user is in (what the gateway calls per response)."""
        self._append(exposure_records(user_id, assignments, items, ts, request_id, surface, device))

    def record_feedback(
        self,
        user_id: str,
        assignments: Sequence[Assignment],
        item_ids: Sequence[str],
        *,
        event: str = "click",
        ts: float | None = None,
        recommendation_id: str | None = None,
    ) -> None:
        """Feedback on each item for each experiment (what ``IngestEvents`` calls)."""
        self._append(feedback_records(user_id, assignments, item_ids, event, ts, recommendation_id))

    # --- reading and erasure -------------------------------------------------------------
    def records(self) -> Iterator[dict[str, Any]]:
        """Every well-formed record in file order (torn or corrupt lines are skipped)."""
        yield from read_log(self.path)

    def delete_user(self, user_id: str) -> int:
        """Rewrite the log without ``user_id``'s records; returns how many were removed."""
        with self._lock:
            if not self.path.exists():
                return 0
            removed = 0
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
            try:
                with (
                    os.fdopen(fd, "w", encoding="utf-8") as out,
                    self.path.open(encoding="utf-8") as src,
                ):
                    for line in src:
                        rec = _parse(line)
                        if rec is not None and rec.get("user_id") == user_id:
                            removed += 1
                            continue
                        if rec is not None:
                            out.write(line if line.endswith("\n") else line + "\n")
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            return removed


def _feedback(
    experiment: str,
    arm: str,
    user_id: str,
    item_id: str,
    event: str,
    ts: float | None,
    recommendation_id: str | None = None,
) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "type": "feedback",
        "ts": time.time() if ts is None else float(ts),
        "experiment": experiment,
        "arm": arm,
        "user_id": user_id,
        "item_id": str(item_id),
        "event": event,
    }
    if recommendation_id:
        rec["recommendation_id"] = recommendation_id
    return rec


def exposure_records(
    user_id: str,
    assignments: Sequence[Assignment],
    items: Sequence[str],
    ts: float | None = None,
    request_id: str | None = None,
    surface: str = "",
    device: str = "",
) -> list[dict[str, Any]]:
    """One exposure record per experiment the user is in (``surface`` and ``device`` only
    when set, so older readers and records stay as they were)."""
    now = time.time() if ts is None else float(ts)
    recs: list[dict[str, Any]] = []
    for a in assignments:
        rec: dict[str, Any] = {
            "type": "exposure",
            "ts": now,
            "experiment": a.experiment,
            "arm": a.arm,
            "user_id": user_id,
            "items": [str(i) for i in items],
        }
        if request_id:
            rec["request_id"] = request_id
        if surface:
            rec["surface"] = surface
        if device:
            rec["device"] = device
        recs.append(rec)
    return recs


def feedback_records(
    user_id: str,
    assignments: Sequence[Assignment],
    item_ids: Sequence[str],
    event: str = "click",
    ts: float | None = None,
    recommendation_id: str | None = None,
) -> list[dict[str, Any]]:
    """Feedback records on each item for each experiment."""
    now = time.time() if ts is None else float(ts)
    return [
        _feedback(a.experiment, a.arm, user_id, i, event, now, recommendation_id)
        for a in assignments
        for i in item_ids
    ]


def _parse(line: str) -> dict[str, Any] | None:
    line = line.strip()
    if not line:
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) and rec.get("type") in ("exposure", "feedback") else None


def read_log(path: str | Path) -> Iterator[dict[str, Any]]:
    """Records of a log file (see :class:`ExposureLog`); a missing file has none."""
    p = Path(path)
    if not p.exists():
        return
    bad = 0
    with p.open(encoding="utf-8") as f:
        for line in f:
            rec = _parse(line)
            if rec is None:
                bad += line.strip() != ""
                continue
            yield rec
    if bad:
        log.warning("%s: skipped %d malformed line(s)", p, bad)


class ExposureStream:
    """Writer of exposures and feedback to the JetStream exposures stream (see module doc).

    Publishes on the :class:`~services.events.log.BlockingEventLog`'s loop without waiting:
    :meth:`flush` waits for what is in flight (tests, shutdown)."""

    def __init__(self, events: BlockingEventLog) -> None:
        self.events = events
        self.lost = 0  # records the log did not acknowledge
        self._pending: set[concurrent.futures.Future[None]] = set()
        self._guard = threading.Lock()

    def _publish(self, user_id: str, records: list[dict[str, Any]], msg_id: str = "") -> None:
        if not records:
            return
        if not self.events.log.connected:
            self._lose(len(records), "event log not connected")
            return
        future = asyncio.run_coroutine_threadsafe(
            self._send(user_id, records, msg_id), self.events.loop
        )
        with self._guard:
            self._pending.add(future)
        future.add_done_callback(lambda f: self._done(f, len(records)))

    async def _send(self, user_id: str, records: list[dict[str, Any]], msg_id: str) -> None:
        log = self.events.log
        subject = log.exposure_subject(user_id)
        await log.js.publish(
            subject,
            json.dumps(records, separators=(",", ":")).encode(),
            timeout=log.settings.nats_timeout_s,
            stream=log.settings.exposures_stream,
            headers={MSG_ID: f"{log.token(user_id)}.{msg_id}"} if msg_id else None,
        )

    def _done(self, future: concurrent.futures.Future[None], n: int) -> None:
        with self._guard:
            self._pending.discard(future)
        exc = None if future.cancelled() else future.exception()
        if future.cancelled() or exc is not None:
            self._lose(n, repr(exc) if exc else "cancelled")

    def _lose(self, n: int, why: str) -> None:
        with self._guard:
            self.lost += n
        log.warning("%d exposure record(s) not recorded: %s", n, why)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait for the publishes in flight; True when none is left."""
        with self._guard:
            pending = list(self._pending)
        _, not_done = concurrent.futures.wait(pending, timeout=timeout)
        return not not_done

    def record_exposures(
        self,
        user_id: str,
        assignments: Sequence[Assignment],
        items: Sequence[str],
        *,
        ts: float | None = None,
        request_id: str | None = None,
        surface: str = "",
        device: str = "",
    ) -> None:
        recs = exposure_records(user_id, assignments, items, ts, request_id, surface, device)
        self._publish(user_id, recs, f"x.{request_id}" if request_id else "")

    def record_feedback(
        self,
        user_id: str,
        assignments: Sequence[Assignment],
        item_ids: Sequence[str],
        *,
        event: str = "click",
        ts: float | None = None,
        recommendation_id: str | None = None,
    ) -> None:
        recs = feedback_records(user_id, assignments, item_ids, event, ts, recommendation_id)
        self._publish(user_id, recs)

    def delete_user(self, user_id: str) -> int:
        """Nothing to do here: ``forget_user`` purges the user's exposure subject (under
        their lease, with their events)."""
        return 0


def parse_stream_records(data: bytes) -> list[dict[str, Any]]:
    """The records of one exposures-stream message (a malformed one has none)."""
    try:
        recs = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return []
    if not isinstance(recs, list):
        return []
    return [r for r in recs if isinstance(r, dict) and r.get("type") in ("exposure", "feedback")]


async def stream_records(events: EventLog) -> list[dict[str, Any]]:
    """Every record on the exposures stream, in stream order."""
    s = events.settings
    out: list[dict[str, Any]] = []
    async for batch in scan_stream(events, s.exposures_stream, f"{s.exposures_subject}.*"):
        for msg in batch:
            out.extend(parse_stream_records(msg.data))
    return out


def read_stream(settings: Settings) -> list[dict[str, Any]]:
    """Every record on the exposures stream (blocking; raises ``EventLogUnavailable``)."""
    return asyncio.run(with_log(settings, stream_records, "recsys-ab-report"))
