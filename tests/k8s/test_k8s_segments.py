"""The scheduled segment refit: a CronJob running ``python -m ops.segments`` with the
training image and the gateway's settings, never twice at once, allowed to reach Milvus."""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

from k8s_helpers import REPO_ROOT, Rendered, env_values
from test_k8s_networkpolicy import Pod, allowed, pods

NAME = "recsys-segments"


def job_pod(overlay: Rendered) -> dict[str, Any]:
    cronjob = overlay.workload(NAME)
    assert cronjob["kind"] == "CronJob"
    return cronjob["spec"]["jobTemplate"]["spec"]["template"]


def test_segments_cronjob_schedule_and_command(overlay: Rendered) -> None:
    spec = overlay.workload(NAME)["spec"]
    assert spec["concurrencyPolicy"] == "Forbid", "two refits would race on the segments"
    assert len(spec["schedule"].split()) == 5
    job = spec["jobTemplate"]["spec"]
    assert job["activeDeadlineSeconds"] > 0 and job["backoffLimit"] <= 3
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] in {"Never", "OnFailure"}
    (container,) = pod["containers"]
    assert container["command"][:3] == ["python", "-m", "ops.segments"]
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    assert importlib.util.find_spec("ops.segments") is not None


def test_segments_job_runs_the_training_image(overlay: Rendered) -> None:
    (container,) = job_pod(overlay)["spec"]["containers"]
    rayjob = overlay.get("RayJob", "recsys-train")
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert container["image"] == head["image"], "the image that carries ops/ and the full lock"
    assert container["imagePullPolicy"] == head["imagePullPolicy"]


def test_segments_job_uses_the_gateway_settings(
    overlay: Rendered, settings_cls: type, monkeypatch
) -> None:
    """Same Milvus, same collections, same k and dimension as the gateway that searches."""
    from test_k8s_consistency import settings_from_env

    gateway = overlay.workload("gateway")["spec"]["template"]["spec"]["containers"][0]
    (job,) = job_pod(overlay)["spec"]["containers"]
    job_env, gateway_env = env_values(overlay, job), env_values(overlay, gateway)
    assert "secretKeyRef" in job_env["RECSYS_MILVUS_TOKEN"]
    assert job_env["RECSYS_MILVUS_TOKEN"] == gateway_env["RECSYS_MILVUS_TOKEN"]
    job_settings = settings_from_env(settings_cls, job_env, monkeypatch)
    gateway_settings = settings_from_env(settings_cls, gateway_env, monkeypatch)
    for field in (
        "milvus_uri",
        "milvus_db_name",
        "users_collection",
        "segments_collection",
        "segments",
        "embedding_dim",
    ):
        assert getattr(job_settings, field) == getattr(gateway_settings, field), field


def test_segments_job_is_locked_down(overlay: Rendered) -> None:
    pod = job_pod(overlay)["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert overlay.has("ServiceAccount", pod["serviceAccountName"])
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    limits = container["resources"]["limits"]
    assert {"cpu", "memory"} <= set(limits)
    # HOME and scratch space on a writable volume (the root filesystem is read-only)
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/tmp"}
    assert env_values(overlay, container)["HOME"] == "/tmp"


def test_segments_job_reaches_milvus_only(overlay: Rendered) -> None:
    labels = job_pod(overlay)["metadata"]["labels"]
    own = {"kubernetes.io/metadata.name": overlay.namespace}
    job = Pod(NAME, labels, own)
    targets = pods(overlay)
    assert allowed(overlay, job, targets["milvus"], 19530)
    for target, port in [("triton", 8001), ("triton", 8000), ("etcd", 2379), ("minio", 9000)]:
        assert not allowed(overlay, job, targets[target], port), f"{target}:{port}"
    ray_head = targets["ray-head"]
    assert not allowed(overlay, job, ray_head, 8265) and not allowed(overlay, job, ray_head, 6379)
