"""The write-ahead log: durability across SIGKILL, torn tails, idempotency, replay, deletion."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from core.config import REPO_ROOT
from services.api import pb
from services.reliability.wal import MAGIC, WalApplier, WalError, WriteAheadLog, encode_record


def ev(user: str, item: str = "i1", key: str = "") -> pb.Event:
    return pb.Event(user_id=user, item_id=item, event_type=pb.EVENT_TYPE_CLICK, idempotency_key=key)


def all_files_bytes(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file())


def test_append_is_durable_and_recovered(tmp_path: Path) -> None:
    with WriteAheadLog(tmp_path) as wal:
        first = wal.append([ev("u1", "a"), ev("u2", "b")])
        second = wal.append([ev("u1", "c")])
        assert (first.accepted, first.duplicates, first.last_offset) == (2, 0, 1)
        assert second.last_offset == 2
        assert all(r.event.HasField("event_time") for r in first.records)  # stamped
    with WriteAheadLog(tmp_path) as wal:
        assert [r.event.item_id for r in wal.records()] == ["a", "b", "c"]
        assert wal.next_offset == 3
        assert wal.append([ev("u3")]).last_offset == 3


def test_idempotency_keys_count_once_across_restarts(tmp_path: Path) -> None:
    with WriteAheadLog(tmp_path) as wal:
        result = wal.append([ev("u1", key="k1"), ev("u1", key="k1"), ev("u2", key="k1")])
        assert (result.accepted, result.duplicates) == (2, 1)  # keys are per user
        assert wal.append([ev("u1", key="k1"), ev("u1")]).duplicates == 1
    with WriteAheadLog(tmp_path) as wal:  # index rebuilt from the log
        retry = wal.append([ev("u1", key="k1"), ev("u2", key="k1"), ev("u1", key="k2")])
        assert (retry.accepted, retry.duplicates) == (1, 2)
        assert len(list(wal.records())) == 4


def test_pending_and_mark_applied_survive_restart(tmp_path: Path) -> None:
    with WriteAheadLog(tmp_path, segment_bytes=4096) as wal:
        for i in range(30):
            wal.append([ev(f"u{i}", key=f"k{j}") for j in range(10)])
        batches = list(wal.pending(max_events=64))
        assert [len(b.records) for b in batches][:4] == [64, 64, 64, 64]
        assert sum(len(b.records) for b in batches) == 300
        assert len(list(tmp_path.glob("*.wal"))) > 1  # rolled over
        for batch in wal.pending(max_events=100):
            wal.mark_applied(batch.last_offset)
            if batch.last_offset >= 149:
                break
    with WriteAheadLog(tmp_path, segment_bytes=4096) as wal:
        assert wal.applied_offset == 199  # batches of 100: the second ended at 199
        rest = [r.offset for b in wal.pending() for r in b.records]
        assert rest == list(range(200, 300))
        with pytest.raises(ValueError):
            wal.mark_applied(10_000)


def test_torn_tail_is_truncated_and_appends_continue(tmp_path: Path) -> None:
    with WriteAheadLog(tmp_path) as wal:
        wal.append([ev("u1", "a"), ev("u1", "b")])
    segment = next(tmp_path.glob("*.wal"))
    good = segment.stat().st_size
    record = encode_record(2, ev("u1", "torn").SerializeToString())
    with segment.open("ab") as fh:
        fh.write(record[: len(record) // 2])  # a crash mid-write
    with WriteAheadLog(tmp_path) as wal:
        assert [r.event.item_id for r in wal.records()] == ["a", "b"]
        assert segment.stat().st_size == good
        assert wal.append([ev("u1", "c")]).last_offset == 2
    with WriteAheadLog(tmp_path) as wal:
        assert [r.event.item_id for r in wal.records()] == ["a", "b", "c"]


def test_corrupt_tail_record_is_dropped(tmp_path: Path) -> None:
    with WriteAheadLog(tmp_path) as wal:
        wal.append([ev("u1", "a"), ev("u1", "b")])
    segment = next(tmp_path.glob("*.wal"))
    data = bytearray(segment.read_bytes())
    data[-6] ^= 0xFF  # flip a byte inside the last record: its CRC no longer matches
    segment.write_bytes(bytes(data))
    with WriteAheadLog(tmp_path) as wal:
        assert [r.event.item_id for r in wal.records()] == ["a"]
        assert wal.next_offset == 1


def test_half_created_segment_is_repaired(tmp_path: Path) -> None:
    with WriteAheadLog(tmp_path) as wal:
        wal.append([ev("u1")])
    (tmp_path / f"{5:020d}.wal").write_bytes(MAGIC[:3])
    with WriteAheadLog(tmp_path) as wal:
        assert wal.append([ev("u2")]).last_offset == 5
        assert [r.offset for r in wal.records()] == [0, 5]


def test_delete_user_leaves_no_trace(tmp_path: Path) -> None:
    with WriteAheadLog(tmp_path, segment_bytes=4096) as wal:
        for i in range(50):
            wal.append([ev("victim-7", f"i{i}", key=f"v{i}"), ev(f"other{i}", f"i{i}")])
        assert wal.delete_user("victim-7") == 50
        assert b"victim-7" not in all_files_bytes(tmp_path)
        remaining = list(wal.records())
        assert len(remaining) == 50 and {r.offset % 2 for r in remaining} == {1}
        assert wal.append([ev("victim-7", key="v1")]).accepted == 1  # keys forgotten too
        assert wal.delete_user("victim-7") == 1
        assert wal.delete_user("nobody") == 0
        assert wal.append([ev("x")]).last_offset == 101
    with WriteAheadLog(tmp_path) as wal:
        assert len(list(wal.records())) == 51
        assert b"victim-7" not in all_files_bytes(tmp_path)


def test_compact_drops_old_applied_segments_only(tmp_path: Path) -> None:
    now = [time.time()]
    with WriteAheadLog(tmp_path, segment_bytes=4096, retention_s=60, clock=lambda: now[0]) as wal:
        for i in range(40):
            wal.append([ev(f"u{i}", key=f"k{j}") for j in range(5)])
        segments = len(list(tmp_path.glob("*.wal")))
        assert wal.compact() == 0  # nothing applied yet
        wal.mark_applied(99)
        assert wal.compact() == 0  # applied, but within retention
        now[0] += 3600
        dropped = wal.compact()
        assert 0 < dropped < segments
        assert {r.offset for r in wal.records()} >= set(range(100, 200))  # unapplied stay
        assert wal.append([ev("u39", key="k0")]).duplicates == 1  # retained keys still count


def test_second_process_cannot_open_the_same_log(tmp_path: Path) -> None:
    with WriteAheadLog(tmp_path):
        code = (
            f"from services.reliability.wal import WriteAheadLog; WriteAheadLog({str(tmp_path)!r})"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode != 0 and "in use" in proc.stderr
    with pytest.raises(WalError), WriteAheadLog(tmp_path), WriteAheadLog(tmp_path):
        pass


WRITER = textwrap.dedent(
    """
    import sys
    from services.api import pb
    from services.reliability.wal import WriteAheadLog
    wal = WriteAheadLog(sys.argv[1])
    n = 0
    while True:
        events = [
            pb.Event(user_id=f"u{n % 7}", item_id=f"i{n}-{j}", event_type=1,
                     idempotency_key=f"k{n}-{j}")
            for j in range(20)
        ]
        wal.append(events)
        print(n, flush=True)  # acknowledged: append returned, so it is on disk
        n += 1
    """
)


def test_every_acknowledged_append_survives_sigkill(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    acked: list[int] = []
    deadline = time.monotonic() + 60
    try:
        assert proc.stdout is not None
        while len(acked) < 200 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            acked.append(int(line))
        os.kill(proc.pid, signal.SIGKILL)  # mid-loop, likely mid-append
        proc.wait(timeout=10)
        acked.extend(int(line) for line in proc.stdout.read().split())
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(acked) >= 200, "writer too slow or died"
    with WriteAheadLog(tmp_path) as wal:
        stored = {r.event.idempotency_key for r in wal.records()}
        for n in acked:
            assert all(f"k{n}-{j}" in stored for j in range(20)), n
        offsets = [r.offset for r in wal.records()]
        assert offsets == list(range(len(offsets)))  # no holes, no torn record read back
        retry = wal.append([ev(f"u{acked[-1] % 7}", f"i{acked[-1]}-0", key=f"k{acked[-1]}-0")])
        assert retry.duplicates == 1


def test_applier_replays_in_order_and_retries(tmp_path: Path) -> None:
    applied: list[str] = []
    failures = [2]

    def apply(events: list[pb.Event]) -> None:
        if failures[0]:
            failures[0] -= 1
            raise ConnectionError("milvus down")
        applied.extend(e.item_id for e in events)

    with WriteAheadLog(tmp_path) as wal:
        wal.append([ev("u1", "before-restart")])
    with WriteAheadLog(tmp_path) as wal:
        applier = WalApplier(wal, apply, max_events=2, retry_s=(0.01, 0.05)).start()
        try:
            result = applier.submit([ev("u1", f"i{i}") for i in range(5)])
            assert applier.wait_applied(result.last_offset, timeout=10)
            assert applied == ["before-restart", *[f"i{i}" for i in range(5)]]
            assert applier.failures == 2
            assert not applier.wait_applied(result.last_offset + 1, timeout=0.05)
        finally:
            applier.stop()
        assert list(wal.pending()) == []


def test_applier_skips_a_poison_batch_after_max_attempts(tmp_path: Path) -> None:
    def apply(events: list[pb.Event]) -> None:
        if any(e.item_id == "poison" for e in events):
            raise ValueError("cannot apply")

    with WriteAheadLog(tmp_path) as wal:
        applier = WalApplier(wal, apply, max_events=1, is_transient=lambda e: False, max_attempts=3)
        wal.append([ev("u1", "ok"), ev("u1", "poison"), ev("u1", "fine")])
        steps = [applier._step() for _ in range(6)]
        assert steps == [1, -1, -1, 1, 1, 0]
        assert wal.applied_offset == 2
