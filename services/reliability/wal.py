"""Write-ahead log of ingested events: durable before ``IngestEvents`` answers, replayed after
a crash, idempotent under retries, and able to forget a user.

API (every method is thread-safe; one process owns a directory, enforced with ``flock``)::

    wal = WriteAheadLog(settings.wal_dir, fsync=settings.wal_fsync,
                        segment_bytes=settings.wal_segment_bytes,
                        retention_s=settings.wal_retention_s)     # or WriteAheadLog.from_settings
    result = wal.append(events)    # Sequence[pb.Event] -> AppendResult
    #   An event whose (user_id, idempotency_key) was appended before (within the retention
    #   window, across restarts) or earlier in the same call is skipped and counted in
    #   result.duplicates. The others get increasing offsets, events without event_time are
    #   stamped with the server clock (so a replay applies the same event), and all are
    #   written and fsync'd before append returns: result.accepted, result.records,
    #   result.last_offset (-1 when nothing was new). Raises WalError if the disk fails.
    for batch in wal.pending(max_events=1000):   # offsets > the applied watermark, in order
        apply(batch.events)
        wal.mark_applied(batch.last_offset)      # durable watermark: "everything <= applied"
    wal.delete_user(user_id) -> int   # rewrites segments without the user's events and keys
    wal.compact() -> int              # deletes applied segments older than retention_s
    wal.close()

:class:`WalApplier` runs that ``pending``/``mark_applied`` loop on a thread (in offset order,
one batch at a time, retrying while the stores are down) so the servicer only appends and
waits: see its docstring for the gateway wiring.

On disk: ``<dir>/<first offset, 20 digits>.wal`` segments starting with :data:`MAGIC`, then
records ``<u64 offset><u32 length><serialized pb.Event><u32 crc32 of the previous bytes>``,
and ``<dir>/applied`` (the watermark, replaced atomically). A crash mid-append leaves at most
a partial last record, which was never acknowledged: recovery truncates it (torn tail). The
idempotency index (16-byte BLAKE2 digests of user id + key -> segment) lives in memory and is
rebuilt from the segments on open. Delivery to profiles is at-least-once: a crash after
``apply`` and before ``mark_applied`` re-applies that one batch on restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from core.config import Settings
from services.api import pb

log = logging.getLogger(__name__)

MAGIC = b"RECSYSW1"
_HEAD = struct.Struct("<QI")  # offset, payload length
_CRC = struct.Struct("<I")
MAX_RECORD_BYTES = 16 * 1024 * 1024
SUFFIX = ".wal"
APPLIED = "applied"


class WalError(RuntimeError):
    """The log could not be written durably (disk full, I/O error): answer UNAVAILABLE."""


@dataclass(frozen=True)
class Record:
    """One logged event and its position in the log."""

    offset: int
    event: pb.Event


@dataclass(frozen=True)
class AppendResult:
    """What one :meth:`WriteAheadLog.append` stored, and how many it skipped as retries."""

    records: list[Record]
    duplicates: int

    @property
    def accepted(self) -> int:
        return len(self.records)

    @property
    def last_offset(self) -> int:
        return self.records[-1].offset if self.records else -1


@dataclass(frozen=True)
class Batch:
    """Consecutive unapplied records, oldest first."""

    records: list[Record]

    @property
    def events(self) -> list[pb.Event]:
        return [r.event for r in self.records]

    @property
    def first_offset(self) -> int:
        return self.records[0].offset

    @property
    def last_offset(self) -> int:
        return self.records[-1].offset


@dataclass
class _Scan:
    """A segment read from disk: its records and where its valid bytes end."""

    records: list[tuple[int, bytes, int]] = field(default_factory=list)  # offset, payload, end
    valid_end: int = len(MAGIC)
    size: int = 0
    damaged: bool = False


def idempotency_digest(user_id: str, key: str) -> bytes:
    """What the index keeps of an idempotency key: scoped to the user, 16 bytes."""
    data = user_id.encode("utf-8", "replace") + b"\0" + key.encode("utf-8", "replace")
    return hashlib.blake2b(data, digest_size=16).digest()


def encode_record(offset: int, payload: bytes) -> bytes:
    head = _HEAD.pack(offset, len(payload))
    return head + payload + _CRC.pack(zlib.crc32(head + payload))


def _scan_bytes(data: bytes, start: int = len(MAGIC)) -> _Scan:
    scan = _Scan(valid_end=start, size=len(data))
    pos = start
    while pos < len(data):
        if pos + _HEAD.size > len(data):
            scan.damaged = True
            break
        offset, length = _HEAD.unpack_from(data, pos)
        end = pos + _HEAD.size + length + _CRC.size
        if length > MAX_RECORD_BYTES or end > len(data):
            scan.damaged = True
            break
        body = data[pos : end - _CRC.size]
        (crc,) = _CRC.unpack_from(data, end - _CRC.size)
        if crc != zlib.crc32(body):
            scan.damaged = True
            break
        scan.records.append((offset, body[_HEAD.size :], end))
        pos = scan.valid_end = end
    return scan


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class WriteAheadLog:
    """Segmented, checksummed, fsync'd event log with an idempotency index."""

    def __init__(
        self,
        directory: Path,
        *,
        fsync: bool = True,
        segment_bytes: int = 8 * 1024 * 1024,
        retention_s: float = 86400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = Path(directory)
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.retention_s = retention_s
        self.clock = clock
        self._lock = threading.RLock()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise WalError(f"{self.directory} is in use by another process") from None
        self._segments: list[int] = []
        self._index: dict[bytes, int] = {}
        self._positions: dict[int, tuple[int, int]] = {}  # batch last offset -> (segment, end)
        self._applied = self._read_applied()
        self._next = 0
        self._fd = -1
        self._size = 0
        self._broken: Exception | None = None
        self._recover()

    @classmethod
    def from_settings(cls, settings: Settings) -> WriteAheadLog:
        return cls(
            settings.wal_dir,
            fsync=settings.wal_fsync,
            segment_bytes=settings.wal_segment_bytes,
            retention_s=settings.wal_retention_s,
        )

    # --- paths and recovery ------------------------------------------------------------
    def _path(self, segment: int) -> Path:
        return self.directory / f"{segment:020d}{SUFFIX}"

    def _read_applied(self) -> int:
        try:
            return int((self.directory / APPLIED).read_text().strip() or -1)
        except FileNotFoundError:
            return -1

    def _recover(self) -> None:
        for tmp in self.directory.glob("*.tmp"):
            tmp.unlink()
        self._segments = sorted(
            int(p.stem) for p in self.directory.glob(f"*{SUFFIX}") if p.stem.isdigit()
        )
        highest = -1
        for i, segment in enumerate(list(self._segments)):
            path = self._path(segment)
            data = path.read_bytes()
            last = i == len(self._segments) - 1
            if not data.startswith(MAGIC):
                if last and len(data) < len(MAGIC) and MAGIC.startswith(data):
                    path.write_bytes(MAGIC)  # crashed while creating it
                    data = MAGIC
                else:
                    log.error("WAL %s: not a segment (bad header); renamed *.corrupt", path.name)
                    path.rename(path.with_suffix(".corrupt"))
                    self._segments.remove(segment)
                    continue
            scan = _scan_bytes(data)
            for offset, payload, _ in scan.records:
                highest = max(highest, offset)
                self._index_payload(payload, segment)
            if scan.damaged and last:
                log.warning(
                    "WAL %s: torn tail of %d bytes (an unacknowledged append) truncated",
                    path.name,
                    scan.size - scan.valid_end,
                )
                os.truncate(path, scan.valid_end)
                self._sync_file(path)
            elif scan.damaged:
                log.error(
                    "WAL %s: corrupt record at byte %d; %d bytes after it are unreadable",
                    path.name,
                    scan.valid_end,
                    scan.size - scan.valid_end,
                )
        self._next = max(
            highest + 1, self._applied + 1, self._segments[-1] if self._segments else 0
        )
        if not self._segments:
            self._new_segment()
        else:
            self._open_active()
        log.info(
            "WAL %s: %d segment(s), next offset %d, applied through %d, %d pending",
            self.directory,
            len(self._segments),
            self._next,
            self._applied,
            max(0, highest - self._applied),
        )

    def _index_payload(self, payload: bytes, segment: int) -> None:
        event = pb.Event.FromString(payload)
        if event.idempotency_key:
            self._index[idempotency_digest(event.user_id, event.idempotency_key)] = segment

    def _sync_file(self, path: Path) -> None:
        if self.fsync:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _open_active(self) -> None:
        path = self._path(self._segments[-1])
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self._size = os.fstat(self._fd).st_size

    def _new_segment(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        segment = self._next
        path = self._path(segment)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o600)
        _write_all(fd, MAGIC)
        if self.fsync:
            os.fsync(fd)
            _fsync_dir(self.directory)
        self._segments.append(segment)
        self._fd, self._size = fd, len(MAGIC)

    # --- writing -------------------------------------------------------------------------
    def append(self, events: Sequence[pb.Event]) -> AppendResult:
        """Store the new events durably; see the module docstring."""
        with self._lock:
            if self._broken is not None:
                raise WalError(f"WAL unusable after an earlier I/O error: {self._broken}")
            if self._size >= self.segment_bytes:
                self._new_segment()
            records: list[Record] = []
            digests: list[bytes] = []
            chunks: list[bytes] = []
            duplicates = 0
            batch_keys: set[bytes] = set()
            now_ms = int(self.clock() * 1000)
            for event in events:
                if event.idempotency_key:
                    digest = idempotency_digest(event.user_id, event.idempotency_key)
                    if digest in self._index or digest in batch_keys:
                        duplicates += 1
                        continue
                    batch_keys.add(digest)
                    digests.append(digest)
                if not event.HasField("event_time"):
                    stamped = pb.Event()
                    stamped.CopyFrom(event)
                    stamped.event_time.FromMilliseconds(now_ms)
                    event = stamped
                offset = self._next + len(records)
                chunks.append(encode_record(offset, event.SerializeToString()))
                records.append(Record(offset, event))
            if records:
                data = b"".join(chunks)
                try:
                    _write_all(self._fd, data)
                    if self.fsync:
                        os.fsync(self._fd)
                except OSError as exc:
                    self._broken = exc
                    with contextlib.suppress(OSError):
                        os.ftruncate(self._fd, self._size)
                    raise WalError(f"WAL append failed: {exc}") from exc
                self._size += len(data)
                self._next += len(records)
                segment = self._segments[-1]
                for digest in digests:
                    self._index[digest] = segment
            return AppendResult(records, duplicates)

    # --- replay --------------------------------------------------------------------------
    @property
    def applied_offset(self) -> int:
        """Every record at or below this offset has been applied."""
        return self._applied

    @property
    def next_offset(self) -> int:
        return self._next

    def pending(self, max_events: int = 1000) -> Iterator[Batch]:
        """Unapplied records in offset order, in batches of at most ``max_events``."""
        after = self._applied
        while True:
            batch = self._next_batch(after, max_events)
            if batch is None:
                return
            yield batch
            after = max(batch.last_offset, self._applied)

    def _next_batch(self, after: int, max_events: int) -> Batch | None:
        with self._lock:
            if after >= self._next - 1:
                return None
            start = self._positions.get(after)
            if start is None:
                candidates = [s for s in self._segments if s <= after + 1]
                start = (candidates[-1] if candidates else self._segments[0], len(MAGIC))
            segment, pos = start
            records: list[Record] = []
            end = start
            for seg in self._segments[self._segments.index(segment) :]:
                base = pos if seg == segment else len(MAGIC)
                with self._path(seg).open("rb") as fh:
                    fh.seek(base)
                    scan = _scan_bytes(fh.read(), 0)
                for offset, payload, relative_end in scan.records:
                    record_end = base + relative_end
                    if offset <= after:
                        continue
                    records.append(Record(offset, pb.Event.FromString(payload)))
                    end = (seg, record_end)
                    if len(records) >= max_events:
                        break
                if len(records) >= max_events:
                    break
            if not records:
                return None
            self._positions[records[-1].offset] = end
            return Batch(records)

    def mark_applied(self, offset: int) -> None:
        """Record durably that every record up to ``offset`` is applied."""
        with self._lock:
            if offset <= self._applied:
                return
            if offset >= self._next:
                raise ValueError(f"offset {offset} was never appended (next is {self._next})")
            tmp = self.directory / f"{APPLIED}.tmp"
            tmp.write_text(str(offset))
            self._sync_file(tmp)
            os.replace(tmp, self.directory / APPLIED)
            if self.fsync:
                _fsync_dir(self.directory)
            self._applied = offset
            self._positions = {k: v for k, v in self._positions.items() if k >= offset}

    # --- privacy and housekeeping --------------------------------------------------------
    def records(self) -> Iterator[Record]:
        """Every readable record, oldest first (verification and tests)."""
        with self._lock:
            segments = list(self._segments)
        for segment in segments:
            with contextlib.suppress(FileNotFoundError):
                for offset, payload, _ in _scan_bytes(self._path(segment).read_bytes()).records:
                    yield Record(offset, pb.Event.FromString(payload))

    def delete_user(self, user_id: str) -> int:
        """Rewrite every segment holding ``user_id``'s events without them; returns how many.

        Offsets of other records are kept. The user's idempotency keys are forgotten too, so
        a retry of an old event after deletion is stored again (it is new data).
        """
        needle = user_id.encode("utf-8", "replace")
        removed = 0
        with self._lock:
            for segment in self._segments:
                path = self._path(segment)
                data = path.read_bytes()
                if needle not in data:
                    continue
                kept: list[bytes] = [MAGIC]
                dropped = 0
                for offset, payload, _ in _scan_bytes(data).records:
                    event = pb.Event.FromString(payload)
                    if event.user_id == user_id:
                        dropped += 1
                        if event.idempotency_key:
                            digest = idempotency_digest(user_id, event.idempotency_key)
                            self._index.pop(digest, None)
                    else:
                        kept.append(encode_record(offset, payload))
                if not dropped:
                    continue
                removed += dropped
                self._rewrite(segment, b"".join(kept))
            self._positions.clear()
        if removed:
            log.info("WAL: removed %d event(s) of a deleted user", removed)
        return removed

    def _rewrite(self, segment: int, data: bytes) -> None:
        path = self._path(segment)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        active = segment == self._segments[-1]
        if active:
            os.close(self._fd)
        os.replace(tmp, path)
        _fsync_dir(self.directory)
        if active:
            self._open_active()

    def compact(self) -> int:
        """Delete segments fully applied and older than the retention; returns how many."""
        deleted = 0
        with self._lock:
            horizon = self.clock() - self.retention_s
            for i, segment in enumerate(self._segments[:-1]):
                path = self._path(segment)
                if self._segments[i + 1] - 1 > self._applied:
                    break
                if path.stat().st_mtime > horizon:
                    break
                path.unlink()
                deleted += 1
            if deleted:
                gone = set(self._segments[:deleted])
                self._segments = self._segments[deleted:]
                self._index = {k: s for k, s in self._index.items() if s not in gone}
                self._positions.clear()
                _fsync_dir(self.directory)
        return deleted

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if self._lock_fd >= 0:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = -1

    def __enter__(self) -> WriteAheadLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WalApplier:
    """Applies the log to profiles on one thread, in order, retrying while stores are down.

    Gateway wiring (in ``GatewayState``/the servicer)::

        self.wal = WriteAheadLog.from_settings(settings)
        self.applier = WalApplier(
            self.wal, lambda events: self.profiles.apply(events, Deadline.after(30.0))
        )
        self.applier.start()              # replays what a crash left unapplied, then follows

        # IngestEvents / StreamIngestEvents, after validation:
        result = self.applier.submit(events)          # durable on return (WalError -> 503)
        self.applier.wait_applied(result.last_offset, deadline.left())  # read-your-writes
        return result.accepted, result.duplicates     # OK even if not yet applied: durable

        # DeleteUser:
        with self.applier.exclusive():    # no batch of this user is being applied meanwhile
            removed = self.wal.delete_user(user_id)
            existed = store.delete_user(user_id, deadline.left()) or removed > 0

    ``apply`` gets batches of at most ``max_events`` events. An exception for which
    ``is_transient`` is true (default: every exception) is retried with backoff forever;
    otherwise the batch is skipped after ``max_attempts`` tries and logged at ERROR (its
    events stay in the log until retention, for a manual replay).
    """

    def __init__(
        self,
        wal: WriteAheadLog,
        apply: Callable[[list[pb.Event]], object],
        *,
        max_events: int = 1000,
        is_transient: Callable[[Exception], bool] = lambda exc: True,
        max_attempts: int = 5,
        retry_s: tuple[float, float] = (0.2, 5.0),
        compact_every_s: float = 60.0,
    ) -> None:
        self.wal = wal
        self.apply = apply
        self.max_events = max_events
        self.is_transient = is_transient
        self.max_attempts = max_attempts
        self.retry_s = retry_s
        self.compact_every_s = compact_every_s
        self._exclusive = threading.RLock()
        self._changed = threading.Condition()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failures = 0
        self._attempts = (-1, 0)  # (first offset of the failing batch, tries so far)

    def start(self) -> WalApplier:
        self._thread = threading.Thread(target=self._run, name="wal-applier", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, events: Sequence[pb.Event]) -> AppendResult:
        """Append durably and wake the applier."""
        result = self.wal.append(events)
        if result.records:
            self._wake.set()
        return result

    def wait_applied(self, offset: int, timeout: float) -> bool:
        """Wait until ``offset`` is applied; False when ``timeout`` passed first."""
        end = time.monotonic() + max(0.0, timeout)
        with self._changed:
            while self.wal.applied_offset < offset:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def exclusive(self) -> contextlib.AbstractContextManager[object]:
        """Hold off the applier (e.g. while a user is deleted everywhere)."""
        return self._exclusive

    def drain(self) -> int:
        """Apply everything pending now, on the calling thread; returns events applied."""
        applied = 0
        while (step := self._step()) > 0:
            applied += step
        return applied

    def _step(self) -> int:
        """Apply one batch: its size, 0 when nothing is pending, -1 on a failure."""
        with self._exclusive:
            batch = next(self.wal.pending(self.max_events), None)
            if batch is None:
                return 0
            try:
                self.apply(batch.events)
            except Exception as exc:
                self.failures += 1
                first, tries = self._attempts
                tries = tries + 1 if first == batch.first_offset else 1
                self._attempts = (batch.first_offset, tries)
                if self.is_transient(exc) or tries < self.max_attempts:
                    log.warning(
                        "WAL apply of offsets %d-%d failed (%s); will retry",
                        batch.first_offset,
                        batch.last_offset,
                        exc,
                    )
                    return -1
                log.error(
                    "WAL apply of offsets %d-%d failed %d times; skipped: %s",
                    batch.first_offset,
                    batch.last_offset,
                    tries,
                    exc,
                )
            self.wal.mark_applied(batch.last_offset)
        with self._changed:
            self._changed.notify_all()
        return len(batch.records)

    def _run(self) -> None:
        delay = self.retry_s[0]
        last_compact = time.monotonic()
        while not self._stop.is_set():
            try:
                step = self._step()
            except Exception:  # the applier must outlive any single failure
                log.exception("WAL applier step failed")
                step = -1
            if step > 0:
                delay = self.retry_s[0]
                continue
            if step < 0:
                self._stop.wait(delay)
                delay = min(delay * 2, self.retry_s[1])
                continue
            if time.monotonic() - last_compact > self.compact_every_s:
                last_compact = time.monotonic()
                with contextlib.suppress(OSError):
                    self.wal.compact()
            self._wake.wait(0.5)
            self._wake.clear()
