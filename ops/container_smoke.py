"""``make container-smoke``: the gateway image started as its pod would start it.

The dev overlay is rendered (``kubectl kustomize``) and the gateway container's run is derived
from it (ops/pod_container.py): read-only root, its UID/GID and fsGroup, dropped
capabilities, its limits, the ConfigMap's and Secrets' environment and the volumes at the
paths the manifests mount. Only the cluster addresses and ports are replaced by those of a
local Triton and Milvus (ops/stack.py) on the host network. Passes when the container's health
is SERVING, one Recommend is answered and the container started as many gateway processes
as the manifests ask for; a start-up crash fails it with the container's log.
Figures (build, start-up, Recommend, stop) go to var/container-smoke/report.json.

    python -m ops.container_smoke [--overlay dev] [--no-build]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pandas as pd
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core.config import REPO_ROOT, Settings
from ops.docker_engine import docker, docker_engine, image_size
from ops.pod_container import ContainerRun, container_run, prepare
from ops.processes import StartupError, free_port
from ops.stack import LocalStack, local_stack

WORK = REPO_ROOT / "var" / "container-smoke"
MOVIELENS = REPO_ROOT / "third_party" / "movielens" / "ml-latest-small"
N_MOVIES = 400  # as tests/stack_fixtures.py: indexing through Triton takes seconds
NAME = "recsys-container-smoke"


def render(overlay: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise SystemExit("kubectl not found: `make kubectl-installed`")
    text = subprocess.run(
        [kubectl, "kustomize", str(REPO_ROOT / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [d for d in yaml.safe_load_all(text) if d]


# Settings that name cluster addresses (Services): the local stack's values replace them.
ADDRESS_SETTINGS = ("RECSYS_TRITON_URL", "RECSYS_MILVUS_URI", "RECSYS_NATS_URLS")


def stack_overrides(
    stack: LocalStack, manifest_env: dict[str, str], grpc_port: int, metrics_port: int
) -> dict[str, str]:
    """Cluster addresses and ports replaced by the local stack's (host network). An address
    the manifests give as a ``dns:///`` target (a headless Service) stays one, so the
    client's resolver and load-balancing path is the one a pod runs."""
    local = stack.env()
    addresses = {key: local[key] for key in ADDRESS_SETTINGS if key in local}
    for key, value in addresses.items():
        if manifest_env.get(key, "").startswith("dns:///"):
            addresses[key] = f"dns:///{value}"
    return {
        **addresses,
        "RECSYS_GRPC_PORT": str(grpc_port),
        "RECSYS_METRICS_PORT": str(metrics_port),
    }


def small_dataset(out: Path) -> Path:
    """MovieLens cut to its first movies (and their ratings and tags)."""
    out.mkdir(parents=True, exist_ok=True)
    movies = pd.read_csv(MOVIELENS / "movies.csv").head(N_MOVIES)
    for name in ("movies", "ratings", "tags"):
        frame = movies if name == "movies" else pd.read_csv(MOVIELENS / f"{name}.csv")
        frame = frame[frame["movieId"].isin(movies["movieId"])]
        frame.to_csv(out / f"{name}.csv", index=False)
    return out


def model_repository(out: Path) -> Path:
    """A copy of the tracked model repository with one exported release (pretrained)."""
    from ops.demo import ensure_models

    if not out.exists():
        shutil.copytree(
            REPO_ROOT / "model_repository",
            out,
            symlinks=True,
            ignore=lambda d, names: [n for n in names if n.isdigit() or n.startswith(".")],
        )
    ensure_models(Settings(model_repository=out), None)
    return out


def health(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=1.0
        )
        return int(reply.status)


def running(env: dict[str, str], name: str) -> bool:
    state = docker(env, "inspect", "--format", "{{.State.Running}}", name, check=False)
    return state.stdout.strip() == "true"


def logs(env: dict[str, str], name: str, lines: int = 40) -> str:
    out = docker(env, "logs", "--tail", str(lines), name, check=False)
    return out.stdout + out.stderr


@contextlib.contextmanager
def container(env: dict[str, str], name: str, run: ContainerRun) -> Iterator[None]:
    """The container ``name`` running ``run``; removed on exit, whatever happened."""
    docker(env, "rm", "--force", name, check=False)
    prepare(run.host_dirs)
    docker(env, *run.argv(name)[1:])
    try:
        yield
    finally:
        docker(env, "rm", "--force", name, check=False)


def wait_ready(env: dict[str, str], name: str, check: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``check`` passes; fails with the container's log if it exits first."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if not running(env, name):
            raise StartupError(f"{name} exited during start-up:\n{logs(env, name)}")
        with contextlib.suppress(Exception):
            if check():
                return time.monotonic() - started
        time.sleep(0.25)
    raise StartupError(f"{name} not ready after {timeout:.0f}s:\n{logs(env, name)}")


def serving(target: str) -> bool:
    """The gateway's readiness: health of recsys.v1.RecommenderService is SERVING."""
    status = health(target, "recsys.v1.RecommenderService")
    return bool(status == health_pb2.HealthCheckResponse.SERVING)


SUPERVISOR_LINE = re.compile(r"(\d+) gateway processes on \S+ \(pids ([\d, ]+)\)")


def started_processes(log_text: str) -> int:
    """How many gateway processes the container's supervisor says it started (1 when it ran
    none: ``RECSYS_GATEWAY_PROCESSES=1`` serves in the main process)."""
    found = SUPERVISOR_LINE.findall(log_text)
    return int(found[-1][0]) if found else 1


def metrics_answer(port: int) -> bool:
    """The profile worker's probes: GET /metrics answers 200."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as reply:
        return bool(reply.status == 200)


def stop(env: dict[str, str], name: str) -> tuple[float, int]:
    """``docker stop`` (SIGTERM, as the kubelet): seconds taken and the exit code."""
    t0 = time.monotonic()
    docker(env, "stop", "--time", "30", name)
    seconds = time.monotonic() - t0
    code = int(docker(env, "inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip())
    if code != 0:
        raise SystemExit(f"{name} exited {code} on SIGTERM:\n{logs(env, name)}")
    return round(seconds, 2), code


def smoke(env: dict[str, str], docs: list[dict[str, Any]], stack: LocalStack) -> dict[str, object]:
    """The gateway (and the profile worker, where the manifests have one) from the image."""
    figures: dict[str, object] = {}
    grpc_port, metrics_port, worker_port = free_port(), free_port(), free_port()
    manifest_env = container_run(docs, "gateway", "gateway", WORK / "volumes" / "gateway").env
    overrides = stack_overrides(stack, manifest_env, grpc_port, metrics_port)
    run = container_run(docs, "gateway", "gateway", WORK / "volumes" / "gateway", overrides)
    figures["image"] = run.image
    figures["image_mb"] = round(image_size(env, run.image) / 1e6, 1)
    figures["gateway_docker_run"] = " ".join(run.argv(NAME)[2:]).replace(f"{REPO_ROOT}/", "")
    target = f"127.0.0.1:{grpc_port}"
    with container(env, NAME, run):
        figures["gateway_start_to_serving_s"] = round(
            wait_ready(env, NAME, lambda: serving(target), timeout=90), 2
        )
        from recsys_client import RecommenderClient

        t0 = time.monotonic()
        with RecommenderClient(target, timeout=20) as client:
            reply = client.recommend("1", k=10)
        figures["recommend_ms"] = round((time.monotonic() - t0) * 1000, 1)
        if not reply.items:
            raise SystemExit(f"Recommend answered no items:\n{reply}\n{logs(env, NAME)}")
        figures["recommended"], figures["degraded"] = len(reply.items), reply.degraded
        wanted = int(manifest_env.get("RECSYS_GATEWAY_PROCESSES", "1"))
        figures["gateway_processes"] = started_processes(logs(env, NAME, lines=500))
        if figures["gateway_processes"] != wanted:
            raise SystemExit(
                f"the manifests ask for {wanted} gateway processes, the container started "
                f"{figures['gateway_processes']}:\n{logs(env, NAME)}"
            )
        if any(d.get("metadata", {}).get("name") == "profile-worker" for d in docs):
            worker = f"{NAME}-worker"
            worker_env = {**overrides, "RECSYS_WORKER_METRICS_PORT": str(worker_port)}
            worker_run = container_run(
                docs, "profile-worker", "profile-worker", WORK / "volumes" / "worker", worker_env
            )
            with container(env, worker, worker_run):
                figures["worker_start_to_ready_s"] = round(
                    wait_ready(env, worker, lambda: metrics_answer(worker_port), timeout=60), 2
                )
                figures["worker_stop_s"], figures["worker_exit_code"] = stop(env, worker)
        figures["gateway_stop_s"], figures["gateway_exit_code"] = stop(env, NAME)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--overlay", default="dev")
    parser.add_argument("--no-build", action="store_true", help="use the image as it is")
    args = parser.parse_args(argv)
    started = time.monotonic()
    figures: dict[str, object] = {"overlay": args.overlay}
    docs = render(args.overlay)
    with docker_engine() as env:
        if not args.no_build:
            from ops.images import main as build_images

            t0 = time.monotonic()
            build_images(["--only", "gateway"])
            figures["gateway_build_s"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        repository = model_repository(WORK / "model_repository")
        dataset = small_dataset(WORK / "data")
        figures["models_s"] = round(time.monotonic() - t0, 1)
        base = Settings(model_repository=repository, data_dir=dataset, readiness_poll_s=0.5)
        shutil.rmtree(WORK / "var", ignore_errors=True)  # a fresh Milvus, event log, logs
        with local_stack(base, WORK / "var") as stack:
            from ops.demo import index_dataset
            from training.data import load_dataset

            t0 = time.monotonic()
            stack.start_milvus()
            stack.start_triton()
            index_dataset(stack, load_dataset(dataset))  # with the event log
            figures["stack_s"] = round(time.monotonic() - t0, 1)
            figures.update(smoke(env, docs, stack))
    figures["total_s"] = round(time.monotonic() - started, 1)
    (WORK / "report.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    print(
        "container smoke: SERVING and Recommend answered "
        f"({figures['gateway_processes']} gateway processes)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
