"""The whole local stack (Milvus, tritonserver, nats-server, profile worker, gateway) as one
context manager.

Milvus is the Milvus Lite server by default, or the real engine with
``RECSYS_MILVUS_SERVER=engine`` (or ``start_milvus(engine=True)``).

Ports are free ones unless given, so the demo, ``make serve`` and every integration test can
run side by side. Everything started is stopped on exit, also after an error or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core.config import Settings
from ops.processes import (
    ManagedProcess,
    free_port,
    gateway_process,
    milvus_engine_healthy,
    milvus_engine_process,
    milvus_process,
    nats_healthy,
    nats_process,
    port_open,
    profile_worker_process,
    triton_process,
)
from services.inference.triton_client import TritonClient
from training.export.repository import servable_models

log = logging.getLogger(__name__)


@dataclass
class Ports:
    gateway: int = 0
    triton_grpc: int = 0
    triton_http: int = 0
    triton_metrics: int = 0
    milvus: int = 0
    milvus_metrics: int = 0  # the engine's /healthz and /metrics (Milvus Lite has none)
    gateway_metrics: int = 0
    nats: int = 0
    nats_monitor: int = 0  # nats-server's /healthz, /jsz

    def fill(self) -> Ports:
        for name in self.__dataclass_fields__:
            if not getattr(self, name):
                setattr(self, name, free_port())
        return self


@dataclass
class LocalStack:
    """Handles on the running processes and the settings that reach them."""

    settings: Settings
    var_dir: Path
    ports: Ports
    processes: dict[str, ManagedProcess] = field(default_factory=dict)

    @property
    def gateway_target(self) -> str:
        return f"127.0.0.1:{self.ports.gateway}"

    def env(self) -> dict[str, str]:
        """The ``RECSYS_*`` variables a process of this stack runs with."""
        return {
            "RECSYS_GRPC_HOST": "127.0.0.1",
            "RECSYS_GRPC_PORT": str(self.ports.gateway),
            "RECSYS_METRICS_PORT": str(self.ports.gateway_metrics),
            "RECSYS_TRITON_URL": self.settings.triton_url,
            "RECSYS_MILVUS_URI": self.settings.milvus_uri,
            "RECSYS_MILVUS_ITEM_CONSISTENCY": self.settings.milvus_item_consistency,
            "RECSYS_MILVUS_USER_CONSISTENCY": self.settings.milvus_user_consistency,
            "RECSYS_MODEL_REPOSITORY": str(self.settings.model_repository),
            "RECSYS_ITEMS_COLLECTION": self.settings.items_collection,
            "RECSYS_USERS_COLLECTION": self.settings.users_collection,
            "RECSYS_LOG_LEVEL": self.settings.log_level,
            "RECSYS_READINESS_POLL_S": str(self.settings.readiness_poll_s),
            "RECSYS_AGGREGATES_REFRESH_S": str(self.settings.aggregates_refresh_s),
            "RECSYS_EXPOSURE_LOG": str(self.var_dir / "experiments" / "exposures.jsonl"),
            "RECSYS_EXPERIMENTS": self.settings.experiments,
            "RECSYS_RANK_CANDIDATES": str(self.settings.rank_candidates),
            "RECSYS_CROSS_ENCODER_TOP": str(self.settings.cross_encoder_top),
            "RECSYS_GATEWAY_PROCESSES": str(self.settings.gateway_processes),
            "RECSYS_TRITON_FEATURE_RANKER_MODEL": self.settings.triton_feature_ranker_model,
            "RECSYS_TRITON_SEQUENCE_MODEL": self.settings.triton_sequence_model,
            "RECSYS_NATS_URLS": self.settings.nats_urls,
            "RECSYS_PSEUDONYM_KEY": self.settings.pseudonym_key.get_secret_value(),
            "RECSYS_WORKER_METRICS_PORT": "0",
            "RECSYS_WORKER_LEASE_S": str(self.settings.worker_lease_s),
            "RECSYS_INGEST_WAIT_APPLIED_S": str(self.settings.ingest_wait_applied_s),
        }

    # --- processes -----------------------------------------------------------------------
    def start_milvus(
        self, timeout: float | None = None, engine: bool | None = None
    ) -> ManagedProcess:
        """Milvus on ``ports.milvus``, its data under the var dir: the Milvus Lite server, or
        the real engine when ``engine`` (default: the ``milvus_server`` setting, which an
        explicit choice updates, so a restart starts the same kind; ready in 3-12 s here)."""
        if engine is not None:
            kind = "engine" if engine else "lite"
            self.settings = self.settings.model_copy(update={"milvus_server": kind})
        data_dir = milvus_data_dir(self.var_dir, self.settings.milvus_server)
        if self.settings.milvus_server == "engine":
            metrics = self.ports.milvus_metrics
            proc = milvus_engine_process(
                data_dir,
                self.ports.milvus,
                metrics,
                self.var_dir,
                self.settings.milvus_engine_env,
            ).start()
            proc.wait_ready(lambda: milvus_engine_healthy(metrics), timeout or 120)
        else:
            proc = milvus_process(data_dir, self.ports.milvus, self.var_dir)
            proc.start().wait_ready(
                lambda: port_open("127.0.0.1", self.ports.milvus), timeout or 60
            )
        self.processes["milvus"] = proc
        return proc

    def start_triton(self, timeout: float = 180) -> ManagedProcess:
        repository = self.settings.model_repository
        models = servable_models(repository)
        if not models:
            raise RuntimeError(f"{repository} has no exported models: run `make export`")
        proc = triton_process(
            repository,
            models,
            self.var_dir,
            self.ports.triton_grpc,
            self.ports.triton_http,
            self.ports.triton_metrics,
        ).start()
        client = TritonClient(self.settings)
        try:
            proc.wait_ready(client.ready, timeout)
        finally:
            client.close()
        self.processes["triton"] = proc
        return proc

    def start_nats(self, timeout: float = 30) -> ManagedProcess:
        """nats-server with JetStream on ``ports.nats``, its data under ``<var>/nats``."""
        proc = nats_process(
            self.var_dir / "nats", self.ports.nats, self.ports.nats_monitor, self.var_dir
        ).start()
        proc.wait_ready(lambda: nats_healthy(self.ports.nats_monitor), timeout)
        self.processes["nats"] = proc
        return proc

    def start_worker(self, name: str = "profile-worker") -> ManagedProcess:
        """A profile worker applying the events stream (``name``: several may run)."""
        proc = profile_worker_process(self.env(), self.var_dir, f"{name}.log").start()
        self.processes[name] = proc
        return proc

    def start_gateway(self, timeout: float = 60) -> ManagedProcess:
        """The gateway; the event log and one profile worker first, unless already up (the
        gateway is not ready without the log, and ingested events need a worker)."""
        if "nats" not in self.processes:
            self.start_nats()
        if not any(n.startswith("profile-worker") for n in self.processes):
            self.start_worker()
        proc = gateway_process(self.env(), self.var_dir).start()
        # several processes: each check is a new connection, which the kernel gives to any
        # of them; 8 per process in a row all SERVING leave a process unasked with p ~ e^-8
        checks = 1 if self.settings.gateway_processes == 1 else 8 * self.settings.gateway_processes
        proc.wait_ready(lambda: all_serving(self.gateway_target, checks), timeout)
        self.processes["gateway"] = proc
        return proc

    def restart_gateway(self, **settings: object) -> ManagedProcess:
        """The gateway again with some settings changed (benchmarks compare pipelines)."""
        proc = self.processes.pop("gateway", None)
        if proc is not None:
            proc.stop()
        self.settings = self.settings.model_copy(update=settings)
        return self.start_gateway()

    def stop(self) -> None:
        workers = [n for n in self.processes if n.startswith("profile-worker")]
        for name in ("gateway", *workers, "nats", "triton", "milvus"):
            proc = self.processes.pop(name, None)
            if proc is not None:
                proc.stop()


def milvus_data_dir(var_dir: Path, server: str) -> Path:
    """Where a stack's Milvus keeps its data: ``milvus`` (Lite) or ``milvus-engine``."""
    return var_dir / ("milvus-engine" if server == "engine" else "milvus")


#: A channel option: the channel's own TCP connection. gRPC otherwise shares one connection
#: among a process's channels to one target, and gateway processes on one port
#: (``SO_REUSEPORT``) are spread over by connection.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def gateway_serving(target: str, timeout: float = 1.0) -> bool:
    """True when the gateway's health service answers SERVING, asked on a connection of its
    own (:data:`OWN_CONNECTION`)."""
    with grpc.insecure_channel(target, options=OWN_CONNECTION) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def all_serving(target: str, checks: int) -> bool:
    """``checks`` health checks in a row, each on its own connection, all SERVING."""
    return all(gateway_serving(target) for _ in range(checks))


@contextlib.contextmanager
def local_stack(base: Settings, var_dir: Path, ports: Ports | None = None) -> Iterator[LocalStack]:
    """A stack with settings pointing at its own Milvus and Triton; stopped on exit."""
    ports = (ports or Ports()).fill()
    settings = base.model_copy(
        update={
            "triton_url": f"127.0.0.1:{ports.triton_grpc}",
            "milvus_uri": f"http://127.0.0.1:{ports.milvus}",
            "grpc_port": ports.gateway,
            "metrics_port": ports.gateway_metrics,
            "nats_urls": f"nats://127.0.0.1:{ports.nats}",
        }
    )
    stack = LocalStack(settings, var_dir, ports)
    try:
        yield stack
    finally:
        stack.stop()
