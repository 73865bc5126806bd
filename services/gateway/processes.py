"""Several gateway server processes on one port: one Python process serves at most about one
core (the GIL), so a gateway given more CPUs runs ``gateway_processes`` of them.

gRPC Python's own answer (its ``multiprocessing`` example): each process runs a whole server
bound to the same port with ``SO_REUSEPORT``, and the kernel spreads new connections over
them. Connections, not calls: a client's channel stays on one process, as it stays on one
replica behind a Kubernetes Service, and a process's channels to one address share one
connection unless made with ``grpc.use_local_subchannel_pool``; many clients use them all.
Each process is a full gateway, like a replica: its own dependencies' clients, caches and
background refreshes, its own ``grpc_workers`` and ``max_in_flight``. What replicas must
agree on already goes through the event log and Milvus, a client's rate limit included.

This supervisor serves ``/metrics`` for all of them (Prometheus's multiprocess mode: each
process writes its counters to a file under ``PROMETHEUS_MULTIPROC_DIR``, the supervisor
sums them), forwards SIGTERM and SIGINT so each drains its calls, and stops the rest and
exits non-zero when one dies, so the kubelet (or whoever started it) restarts the gateway as
a whole instead of serving with one process missing. It imports no gateway module itself:
its metrics would otherwise be file-backed values of its own.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

from core.config import Settings

log = logging.getLogger(__name__)

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
#: Beyond the drain, what a process gets to exit before it is killed.
EXIT_SLACK_S = 10.0


def metrics_dir() -> tuple[Path, bool]:
    """The directory the processes write their metrics to (``PROMETHEUS_MULTIPROC_DIR`` when
    set, emptied of a previous run's files; else a new temporary one) and whether it is ours
    to remove. Set in the environment before any process starts: prometheus_client picks
    its file-backed values at import."""
    given = os.environ.get(MULTIPROC_DIR)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
        return path, False
    path = Path(tempfile.mkdtemp(prefix="recsys-gateway-metrics-"))
    os.environ[MULTIPROC_DIR] = str(path)
    return path, True


def child_settings(settings: Settings) -> Settings:
    """What each process runs with: no metrics server of its own (the supervisor serves
    theirs). The rest as given: the pseudonym key also names the users' event-log subjects,
    so it must be the profile workers' (empty, it pseudonymises log lines with a random key
    per process, as it would per replica)."""
    return settings.model_copy(update={"metrics_port": 0})


def _run_one(settings: Settings, index: int) -> None:
    """A process's body: the single-process gateway, logging as the supervisor does."""
    from services.gateway.server import serve

    logging.basicConfig(
        level=settings.log_level,
        format=f"%(asctime)s %(levelname)s [gateway {index}] %(name)s: %(message)s",
    )
    serve(settings)


def supervise(settings: Settings) -> int:
    """Start ``settings.gateway_processes`` gateways on ``settings.grpc_port``, serve their
    metrics, and return the exit status once they have stopped: 0 when all drained after a
    signal, 1 when one died on its own."""
    path, ours = metrics_dir()
    child = child_settings(settings)
    context = multiprocessing.get_context("spawn")  # no fork of a process holding threads
    procs: list[BaseProcess] = []
    died: BaseProcess | None = None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        if settings.metrics_port:  # first: a port in use fails before any process starts
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=str(path))
            start_http_server(settings.metrics_port, addr=settings.grpc_host, registry=registry)
        for index in range(settings.gateway_processes):
            proc = context.Process(target=_run_one, args=(child, index), name=f"gateway-{index}")
            proc.start()
            procs.append(proc)
        log.info(
            "%d gateway processes on %s:%d (pids %s)",
            len(procs),
            settings.grpc_host,
            settings.grpc_port,
            ", ".join(str(p.pid) for p in procs),
        )
        died = _wait_for_stop_or_death(procs, stop)
        if died is not None:
            log.error(
                "gateway process %s (pid %s) exited with %s: stopping the others",
                died.name,
                died.pid,
                died.exitcode,
            )
    finally:  # also after an error above: no process left behind
        _stop_all(procs, settings.grace_period_s)
        if ours:
            shutil.rmtree(path, ignore_errors=True)
    return 0 if died is None and all(p.exitcode == 0 for p in procs) else 1


def _wait_for_stop_or_death(procs: list[BaseProcess], stop: threading.Event) -> BaseProcess | None:
    """Block until a signal (None) or until a process exits on its own (that process)."""
    sentinels = {p.sentinel: p for p in procs}
    while not stop.is_set():
        ready = wait(list(sentinels), timeout=0.5)
        if ready:
            proc = sentinels[ready[0]]  # type: ignore[index]
            proc.join(EXIT_SLACK_S)  # reaped: its exit code is known
            return proc
    return None


def _stop_all(procs: list[BaseProcess], grace_s: float) -> None:
    """SIGTERM to every live process (each drains its calls for ``grace_s``), then SIGKILL
    to any still there after the drain and :data:`EXIT_SLACK_S`."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(grace_s + EXIT_SLACK_S)
        if proc.is_alive():
            log.error("gateway process %s did not stop: killed", proc.name)
            proc.kill()
            proc.join()
