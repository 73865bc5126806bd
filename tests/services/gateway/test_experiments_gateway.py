"""A/B experiments through the real gateway: sticky arms in responses, exposures and clicks
on the exposures stream with the arm, the report computed from that stream, and erasure on
DeleteUser."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from recsys_client import RecommenderClient

from ops.processes import free_port, gateway_process
from ops.stack import LocalStack, gateway_serving
from services.api import pb
from services.experiments.exposures import read_stream
from tests.services.events.helpers import wait_for

pytestmark = pytest.mark.integration

EXPERIMENTS = [
    {
        "name": "mmr",
        "salt": "test-salt",
        "arms": [
            {"name": "control", "weight": 50, "variant": {"mmr_lambda": 0.0}},
            {"name": "treatment", "weight": 50, "variant": {"mmr_lambda": 0.6}},
        ],
    }
]


def test_arms_exposures_feedback_report_and_erasure(stack: LocalStack, tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "exposures.jsonl"
    env = {
        **stack.env(),
        "RECSYS_GRPC_PORT": str(port),
        "RECSYS_METRICS_PORT": "0",
        "RECSYS_EXPOSURE_LOG": str(log_path),
        "RECSYS_EXPERIMENTS": json.dumps(EXPERIMENTS),
    }
    gateway = gateway_process(env, tmp_path, "gateway-ab.log").start()
    target = f"127.0.0.1:{port}"
    try:
        gateway.wait_ready(lambda: gateway_serving(target), 60)
        with RecommenderClient(target, timeout=20) as client:
            users = [str(u) for u in range(1, 21)]
            arms = {u: client.recommend(u, k=5).experiment_arm for u in users}
            assert set(arms.values()) == {"mmr=control", "mmr=treatment"}
            assert all(client.recommend(u, k=5).experiment_arm == arms[u] for u in users[:5])
            clicker = "ab-clicker"  # its own user: the erasure below must not touch others
            arms[clicker] = client.recommend(clicker, k=5).experiment_arm
            shown = client.recommend(clicker, k=5).items[0].item.item_id
            click = pb.Event(user_id=clicker, item_id=shown, event_type=pb.EVENT_TYPE_CLICK)
            client.ingest([click])  # the client gives it an idempotency key, kept on retry
            second = pb.Event(user_id=clicker, item_id="1", event_type=pb.EVENT_TYPE_CLICK)
            retried = client.ingest([click, second])  # a retry that carries a new click too
            assert (retried.accepted_count, retried.duplicate_count) == (1, 1)
            assert wait_for(lambda: len(read_stream(stack.settings)) == 29, 10)
            records = read_stream(stack.settings)  # published beside the RPCs, not in them
            assert not log_path.exists()  # the stream, not a pod's file
            exposures = [r for r in records if r["type"] == "exposure"]
            assert len(exposures) == 27
            assert {r["arm"] for r in exposures} == {"control", "treatment"}
            clicks = [r for r in records if r["type"] == "feedback"]
            arm = arms[clicker].split("=")[1]
            assert clicks == [  # the retried click is feedback once
                {**clicks[0], "user_id": clicker, "item_id": shown, "arm": arm},
                {**clicks[1], "user_id": clicker, "item_id": "1", "arm": arm},
            ]
            report = subprocess.run(
                [sys.executable, "-m", "services.experiments.report"],
                env={**os.environ, **stack.env()},
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            ).stdout
            assert "control" in report and "treatment" in report
            client.delete_user(clicker)
            left = read_stream(stack.settings)
            assert len(left) == 25 and not [r for r in left if r["user_id"] == clicker]
    finally:
        gateway.stop()
