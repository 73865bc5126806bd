"""Several gateway processes on one port (``RECSYS_GATEWAY_PROCESSES``): both serve, their
metrics are served once and summed, SIGTERM drains them all, and one dying stops the rest."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from bench import metrics
from ops.processes import ManagedProcess, free_port, gateway_process
from ops.stack import OWN_CONNECTION, LocalStack, gateway_serving
from services.api import pb, pb_grpc

pytestmark = pytest.mark.integration

CALLS = 24  # each on its own connection: all on one process by chance has p = 2^-23


def _children(parent: int) -> list[int]:
    """The spawned gateway processes under ``parent`` (not multiprocessing's resource
    tracker, which runs beside them)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"spawn_main" in cmdline:
            out.append(int(entry.name))
    return sorted(out)


def _requests(samples: list[tuple[str, dict[str, str], float]]) -> float:
    return sum(
        value
        for name, labels, value in samples
        if name == "recsys_requests_total" and labels == {"method": "Recommend", "code": "OK"}
    )


def _start(stack: LocalStack, tmp_path: Path, **extra: str) -> tuple[ManagedProcess, str, int]:
    port, metrics_port = free_port(), free_port()
    env = {
        **stack.env(),
        "RECSYS_GRPC_PORT": str(port),
        "RECSYS_METRICS_PORT": str(metrics_port),
        "RECSYS_GATEWAY_PROCESSES": "2",
        "RECSYS_GRACE_PERIOD_S": "2",
        **extra,
    }
    gateway = gateway_process(env, tmp_path, "gateway-processes.log").start()
    target = f"127.0.0.1:{port}"
    gateway.wait_ready(lambda: gateway_serving(target) and len(_children(gateway.pid)) == 2, 90)
    return gateway, target, metrics_port


def test_two_processes_serve_one_port_and_drain_on_sigterm(
    stack: LocalStack, tmp_path: Path
) -> None:
    metrics_dir, health_port = tmp_path / "metrics", free_port()
    gateway, target, metrics_port = _start(
        stack,
        tmp_path,
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        RECSYS_HEALTH_PORT=str(health_port),
    )
    try:
        children = _children(gateway.pid)
        # both answer: a new connection per call, spread over them by the kernel
        deadline = time.monotonic() + 60
        while not all((metrics_dir / f"counter_{pid}.db").exists() for pid in children):
            assert time.monotonic() < deadline, "a process never served a call"
            with grpc.insecure_channel(target, options=OWN_CONNECTION) as channel:
                stub = pb_grpc.RecommenderServiceStub(channel)
                stub.Recommend(pb.RecommendRequest(user_id="1", k=5), timeout=20)
        for _ in range(CALLS):
            with grpc.insecure_channel(target, options=OWN_CONNECTION) as channel:
                reply = pb_grpc.RecommenderServiceStub(channel).Recommend(
                    pb.RecommendRequest(user_id="1", k=5), timeout=20
                )
            assert len(reply.items) == 5
        per_process = [
            _requests(
                [
                    (s.name, s.labels, s.value)
                    for family in MultiProcessCollector.merge(
                        [str(metrics_dir / f"counter_{pid}.db")], accumulate=True
                    )
                    for s in family.samples
                ]
            )
            for pid in children
        ]
        assert all(n > 0 for n in per_process), per_process
        # one /metrics for all of them: the sum of what each counted
        served = metrics.scrape(metrics_port)
        ok = frozenset({"method": "Recommend", "code": "OK"}.items())
        total = served[("recsys_requests", ok)]
        assert total == sum(per_process) >= CALLS
        assert gateway_serving(f"127.0.0.1:{health_port}")  # the probes' port, shared as well

        # events ingested through one process are in the profile every process reads
        user = "two-process-viewer"
        events = [
            pb.Event(user_id=user, item_id=i, event_type=pb.EVENT_TYPE_RATING, value=5.0)
            for i in ("1", "2", "3")
        ]
        with grpc.insecure_channel(target, options=OWN_CONNECTION) as channel:
            stub = pb_grpc.RecommenderServiceStub(channel)
            stub.IngestEvents(pb.IngestEventsRequest(events=events), timeout=20)
        for _ in range(12):
            with grpc.insecure_channel(target, options=OWN_CONNECTION) as channel:
                profile = pb_grpc.RecommenderServiceStub(channel).GetUserProfile(
                    pb.GetUserProfileRequest(user_id=user), timeout=20
                )
            assert profile.history_size == 3

        assert gateway.proc is not None
        gateway.proc.send_signal(signal.SIGTERM)
        assert gateway.proc.wait(timeout=30) == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in children)
        assert gateway.log_tail(40).count("gateway stopped") == 2
    finally:
        gateway.stop()


def test_a_process_that_dies_stops_the_gateway(stack: LocalStack, tmp_path: Path) -> None:
    gateway, _, _ = _start(stack, tmp_path)
    try:
        first, second = _children(gateway.pid)
        os.kill(first, signal.SIGKILL)
        assert gateway.proc is not None
        assert gateway.proc.wait(timeout=30) == 1  # restarted as a whole, not half-served
        assert not Path(f"/proc/{second}").exists()
        assert "exited with -9: stopping the others" in gateway.log_tail(40)
    finally:
        gateway.stop()
