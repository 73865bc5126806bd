"""Gateway start-up without its dependencies, recovery when they come, graceful stop."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ops.processes import free_port, gateway_process, milvus_process, port_open
from ops.stack import LocalStack

pytestmark = pytest.mark.integration


def _status(target: str) -> int | None:
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
            return int(reply.status)
    except grpc.RpcError:
        return None


def _wait_status(target: str, wanted: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _status(target) == wanted:
            return
        time.sleep(0.2)
    raise AssertionError(f"health of {target} never became {wanted}")


def _wait_log(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared in {path}")


def test_not_serving_until_milvus_is_up_then_graceful_stop(
    stack: LocalStack, tmp_path: Path
) -> None:
    gw_port, milvus_port, health_port = free_port(), free_port(), free_port()
    env = {
        **stack.env(),
        "RECSYS_GRPC_PORT": str(gw_port),
        "RECSYS_METRICS_PORT": "0",
        "RECSYS_MILVUS_URI": f"http://127.0.0.1:{milvus_port}",
        "RECSYS_ITEMS_COLLECTION": "lifecycle_items",
        "RECSYS_USERS_COLLECTION": "lifecycle_users",
        "RECSYS_GRACE_PERIOD_S": "2",
        "RECSYS_HEALTH_PORT": str(health_port),  # plaintext health-only (kubelet probes)
    }
    gateway = gateway_process(env, tmp_path, "gateway-lifecycle.log").start()
    milvus = milvus_process(tmp_path / "milvus", milvus_port, tmp_path)
    target = f"127.0.0.1:{gw_port}"
    try:
        _wait_status(target, health_pb2.HealthCheckResponse.NOT_SERVING, 30)
        _wait_log(gateway.log_path, "NOT_SERVING until", 30)  # says plainly what is missing
        assert "milvus NOT READY" in gateway.log_tail(50)
        assert _status(f"127.0.0.1:{health_port}") == health_pb2.HealthCheckResponse.NOT_SERVING
        milvus.start()
        milvus.wait_ready(lambda: port_open("127.0.0.1", milvus_port), 60)
        _wait_status(target, health_pb2.HealthCheckResponse.SERVING, 60)
        assert _status(f"127.0.0.1:{health_port}") == health_pb2.HealthCheckResponse.SERVING
        started = time.monotonic()
        assert gateway.proc is not None
        gateway.proc.send_signal(signal.SIGTERM)
        assert gateway.proc.wait(timeout=15) == 0
        assert time.monotonic() - started < 10
        assert "gateway stopped" in gateway.log_tail(20)
    finally:
        gateway.stop()
        milvus.stop()
