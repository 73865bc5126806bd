"""The gateway's gRPC server: the API, health, reflection and graceful shutdown."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from core.config import Settings
from services.api import pb, pb_grpc
from services.api.validation import max_receive_bytes
from services.gateway.metrics import MetricsInterceptor, start_metrics_server
from services.gateway.servicer import RecommenderServicer
from services.gateway.state import GatewayState
from services.gc_pauses import freeze_long_lived
from services.reliability import interceptors, max_concurrent_rpcs, pseudonym, server_credentials
from services.reliability.error_details import UnknownMethod

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass
class Gateway:
    """A started server with the state it serves from."""

    server: grpc.Server
    state: GatewayState
    port: int
    health_server: grpc.Server | None = None
    health_port: int = 0

    def stop(self, grace: float) -> None:
        """Refuse new calls, let in-flight ones finish for up to ``grace`` seconds."""
        self.state.begin_shutdown()  # NOT_SERVING first, so balancers stop sending
        self.server.stop(grace).wait()
        if self.health_server is not None:  # said NOT_SERVING through the drain
            self.health_server.stop(0).wait()
        self.state.close()


def health_server(settings: Settings, state: GatewayState) -> tuple[grpc.Server, int]:
    """A plaintext listener serving only grpc.health.v1 from the API server's own health
    servicer: the kubelet's native gRPC probes speak plaintext only, so with TLS (and client
    certificates) on the API port they need this port. No RecommenderService, no
    reflection: nothing but statuses can be reached here."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"),
        options=[("grpc.so_reuseport", 1)],  # every gateway process answers probes
    )
    health_pb2_grpc.add_HealthServicer_to_server(state.health, server)
    port = server.add_insecure_port(f"{settings.grpc_host}:{settings.health_port}")
    if port == 0:
        raise RuntimeError(f"cannot bind health port {settings.grpc_host}:{settings.health_port}")
    server.start()
    return server, port


def build(settings: Settings) -> Gateway:
    """Create and start the server; dependencies may still be down (health says so)."""
    pseudonym.install(settings)  # user ids in log lines become keyed hashes
    credentials = server_credentials(settings)  # bad TLS or key settings fail before binding
    state = GatewayState(settings)
    try:  # auth, per-client rate limit (shared through the event log), bounded concurrency
        guards = interceptors(settings, state.events)
    except Exception:
        state.close()  # a bad key file: no event-log thread left behind
        raise
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.grpc_workers, thread_name_prefix="rpc"),
        interceptors=[MetricsInterceptor(), *guards],  # metrics outermost: counts rejections
        maximum_concurrent_rpcs=max_concurrent_rpcs(settings),
        options=[
            # above the largest valid request, so a too-long list is refused by validation
            # (INVALID_ARGUMENT with details), not by gRPC core (RESOURCE_EXHAUSTED, none)
            ("grpc.max_receive_message_length", max_receive_bytes(settings)),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # several gateway processes share the port (gRPC's default on Linux, made
            # explicit: services.gateway.processes depends on it)
            ("grpc.so_reuseport", 1),
        ],
    )
    pb_grpc.add_RecommenderServiceServicer_to_server(RecommenderServicer(settings, state), server)
    health_pb2_grpc.add_HealthServicer_to_server(state.health, server)
    services = (
        pb.DESCRIPTOR.services_by_name["RecommenderService"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(services, server)
    server.add_generic_rpc_handlers((UnknownMethod(),))  # last: only what nothing serves
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    if credentials is not None:
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot bind {settings.grpc_host}:{settings.grpc_port}")
    health = health_server(settings, state) if settings.health_port else None
    server.start()
    start_metrics_server(settings.metrics_port, settings.grpc_host)
    if not state.check_once():
        log.warning(
            "gateway listening on port %d but NOT_SERVING until Triton (%s) and Milvus (%s) "
            "are ready",
            port,
            settings.triton_url,
            settings.milvus_uri,
        )
    state.start_background()
    log.info("gateway listening on %s:%d", settings.grpc_host, port)
    if health is not None:
        log.info("health-only (grpc.health.v1, plaintext) on %s:%d", settings.grpc_host, health[1])
        return Gateway(server, state, port, health_server=health[0], health_port=health[1])
    return Gateway(server, state, port)


def serve(settings: Settings) -> None:
    """One gateway process until SIGTERM or SIGINT, then a graceful drain (several:
    :func:`services.gateway.processes.supervise`)."""
    gateway = build(settings)
    freeze_long_lived()  # modules, clients, the first catalogue scan (serving may have begun)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down: draining for up to %.1fs", settings.grace_period_s)
    gateway.stop(settings.grace_period_s)
    log.info("gateway stopped")
