"""A ``dns:///`` Triton URL (the headless Service in k8s) gets gRPC's round_robin policy, so
one gateway spreads its calls over every Triton pod instead of sticking to the first."""

from __future__ import annotations

from typing import Any

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from core.config import Settings
from ops.processes import free_port
from services.inference import triton_client
from services.inference.triton_client import TritonClient, channel_args


def test_dns_targets_balance_round_robin() -> None:
    args = dict(channel_args("dns:///triton-headless:8001") or [])
    assert args["grpc.lb_policy_name"] == "round_robin"
    # tritonclient's own defaults are replaced by channel_args: the sizes must stay.
    assert args["grpc.max_receive_message_length"] == grpcclient.MAX_GRPC_MESSAGE_SIZE
    assert channel_args("127.0.0.1:8001") is None


def test_client_passes_the_options(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake(url: str, **kwargs: Any) -> object:
        seen.update(url=url, **kwargs)
        return object()

    monkeypatch.setattr(triton_client.grpcclient, "InferenceServerClient", fake)
    TritonClient(Settings(triton_url="dns:///triton-headless:8001"))
    assert seen["url"] == "dns:///triton-headless:8001"
    assert ("grpc.lb_policy_name", "round_robin") in seen["channel_args"]


def test_real_channel_accepts_a_dns_target() -> None:
    """The options reach a real gRPC channel: a dead port answers 'unavailable', not an
    argument error."""
    url = f"dns:///127.0.0.1:{free_port()}"
    client = grpcclient.InferenceServerClient(url, channel_args=channel_args(url))
    try:
        with pytest.raises(InferenceServerException):
            client.is_server_live(client_timeout=2)
    finally:
        client.close()
