"""Append-only JSONL log of experiment exposures and feedback, with the arm on every line.

Why a plain file: it is the source of truth for the A/B report and must survive gateway
restarts without another service; one JSON object per line keeps appends cheap and a torn
last line (crash mid-write) loses only that line - readers skip it.

Records (``ts`` is Unix seconds)::

    {"type": "exposure", "ts": 1.7e9, "experiment": "mmr", "arm": "treatment",
     "user_id": "42", "items": ["1", "2"], "request_id": "..."}
    {"type": "feedback", "ts": 1.7e9, "experiment": "mmr", "arm": "treatment",
     "user_id": "42", "item_id": "2", "event": "click"}

Thread-safe within a process (one lock per file path, shared by every ``ExposureLog`` on
that path); a single gateway process is expected to write a given file. ``delete_user``
rewrites the file without the user's records and atomically replaces it (erasure requests).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

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
    ) -> None:
        """One exposure per experiment the user is in (what the gateway calls per response)."""
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
            recs.append(rec)
        self._append(recs)

    def record_feedback(
        self,
        user_id: str,
        assignments: Sequence[Assignment],
        item_ids: Sequence[str],
        *,
        event: str = "click",
        ts: float | None = None,
    ) -> None:
        """Feedback on each item for each experiment (what ``IngestEvents`` calls)."""
        self._append(
            [
                _feedback(a.experiment, a.arm, user_id, i, event, ts)
                for a in assignments
                for i in item_ids
            ]
        )

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
    experiment: str, arm: str, user_id: str, item_id: str, event: str, ts: float | None
) -> dict[str, Any]:
    return {
        "type": "feedback",
        "ts": time.time() if ts is None else float(ts),
        "experiment": experiment,
        "arm": arm,
        "user_id": user_id,
        "item_id": str(item_id),
        "event": event,
    }


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
