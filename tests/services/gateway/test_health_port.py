"""The plaintext health-only port (RECSYS_HEALTH_PORT): the kubelet's native gRPC probes.

The gateway runs in-process with its dependencies down (closed ports), which is enough to see
the port serve the very statuses of the API port, through a shutdown too, and nothing else.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core.config import Settings
from ops.processes import free_port
from services.api import pb, pb_grpc
from services.gateway.server import Gateway, build

SERVICE = "recsys.v1.RecommenderService"
STATUS = health_pb2.HealthCheckResponse


def _check(port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
        return int(reply.status)


@pytest.fixture
def gateway(tmp_path: Path):
    settings = Settings(
        grpc_host="0.0.0.0",  # as in a pod: the kubelet probes the pod IP
        grpc_port=0,
        health_port=free_port(),
        metrics_port=0,
        triton_url=f"127.0.0.1:{free_port()}",
        milvus_uri=f"http://127.0.0.1:{free_port()}",
        nats_urls=f"nats://127.0.0.1:{free_port()}",
        var_dir=tmp_path,
        readiness_poll_s=0.2,
    )
    gw = build(settings)
    try:
        yield gw
    finally:
        gw.stop(0)


def test_health_port_mirrors_the_api_port(gateway: Gateway) -> None:
    assert gateway.health_port and gateway.health_port != gateway.port
    for service in ("", SERVICE, "liveness"):
        assert _check(gateway.health_port, service) == _check(gateway.port, service), service
    # Dependencies down: not ready, but alive (liveness must not restart the pod).
    assert _check(gateway.health_port, SERVICE) == STATUS.NOT_SERVING
    assert _check(gateway.health_port, "liveness") == STATUS.SERVING
    # One servicer behind both ports: a change shows on both at once.
    gateway.state.health.set(SERVICE, STATUS.SERVING)
    assert _check(gateway.health_port, SERVICE) == _check(gateway.port, SERVICE) == STATUS.SERVING
    gateway.state.begin_shutdown()
    assert _check(gateway.health_port, SERVICE) == STATUS.NOT_SERVING
    assert _check(gateway.port, SERVICE) == STATUS.NOT_SERVING


def test_health_port_serves_nothing_else(gateway: Gateway) -> None:
    with (
        grpc.insecure_channel(f"127.0.0.1:{gateway.health_port}") as channel,
        pytest.raises(grpc.RpcError) as raised,
    ):
        pb_grpc.RecommenderServiceStub(channel).Recommend(
            pb.RecommendRequest(user_id="u1"), timeout=2
        )
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(grpc.RpcError) as unknown:
        _check(gateway.health_port, "no.such.Service")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_port_closes_with_the_gateway(gateway: Gateway) -> None:
    gateway.stop(0)
    with pytest.raises(grpc.RpcError) as raised:
        _check(gateway.health_port, "liveness")
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def test_health_port_off_by_default() -> None:
    assert Settings().health_port == 0
