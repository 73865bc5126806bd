"""``make images``: the gateway, training and MLflow images, built with ``docker build``.

Base image and package index are build arguments of docker/*.Dockerfile. Where the pinned
upstream base (python:3.11-slim-bookworm by digest) cannot be pulled, docker/base.sh makes a
Debian bookworm base with debootstrap (cached by its tag). Builds run on the host's network
(the only way to the package index on a machine without a bridge). The training image's torch
is requirements.lock's CPU build: from the Dockerfile's index, or, where pip finds that wheel
on local disk (its find-links), from that folder served on loopback for the build.
The Triton image needs NVIDIA's registry and is built only where that answers (--triton).

    python -m ops.images [--only gateway ...] [--triton]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

from core.config import REPO_ROOT
from ops.docker_engine import (
    docker,
    docker_engine,
    ensure_installed,
    image_exists,
    image_size,
    run_streaming,
)
from ops.processes import free_port

LOCAL_BASE = "recsys/base:bookworm-python3.11"
REPORT = REPO_ROOT / "var" / "images" / "report.json"
# Packages the gateway image must not carry (training stacks and test tools).
NOT_IN_GATEWAY = ("torch", "ray", "transformers", "pytest", "hypothesis", "milvus_lite", "mypy")


def project_version() -> str:
    return str(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"])


def locked_version(lock: str, package: str) -> str:
    text = (REPO_ROOT / lock).read_text()
    found = re.search(rf"^{re.escape(package)}==([^\s;\\]+)", text, re.M)
    if found is None:
        raise SystemExit(f"{lock} pins no {package}")
    return found.group(1)


def image_tags() -> dict[str, tuple[str, str]]:
    """image name -> (Dockerfile, tag); the tags the manifests deploy."""
    version = project_version()
    return {
        "gateway": ("docker/gateway.Dockerfile", f"recsys/gateway:{version}"),
        "training": ("docker/training.Dockerfile", f"recsys/training:{version}"),
        "mlflow": (
            "docker/mlflow.Dockerfile",
            f"recsys/mlflow:{locked_version('requirements-mlflow.lock', 'mlflow')}",
        ),
        "triton": ("docker/triton.Dockerfile", "recsys/triton:24.10-py3"),
    }


def upstream_base() -> str:
    text = (REPO_ROOT / "docker" / "gateway.Dockerfile").read_text()
    found = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M)
    assert found, "gateway.Dockerfile has no PYTHON_IMAGE default"
    return found.group(1)


def python_base(env: dict[str, str]) -> tuple[str, float]:
    """The base image to build on and the seconds it took to get: $RECSYS_PYTHON_IMAGE, the
    pinned upstream one when it can be pulled, else the local debootstrap base."""
    if os.environ.get("RECSYS_PYTHON_IMAGE"):
        return os.environ["RECSYS_PYTHON_IMAGE"], 0.0
    upstream = upstream_base()
    if image_exists(env, upstream):
        return upstream, 0.0
    pulled = docker(env, "pull", "--quiet", upstream, check=False, timeout=300)
    if pulled.returncode == 0:
        return upstream, 0.0
    print(f">> {upstream} cannot be pulled here: building on {LOCAL_BASE}", flush=True)
    ensure_installed("debootstrap")
    seconds = run_streaming(
        ["bash", str(REPO_ROOT / "docker" / "base.sh"), LOCAL_BASE],
        env,
        REPO_ROOT / "var" / "images" / "base.log",
    )
    return LOCAL_BASE, seconds


def pip_find_links() -> list[Path]:
    """Local folders pip looks in for wheels ($PIP_FIND_LINKS, pip's configuration)."""
    values = os.environ.get("PIP_FIND_LINKS", "").split()
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        listed = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        values += [
            v
            for line in listed.splitlines()
            if ".find-links=" in line
            for v in line.split("=", 1)[1].strip("'\"").split()
        ]
    return [Path(v.removeprefix("file://")) for v in values if not v.startswith("http")]


def local_torch_wheels() -> Path | None:
    """The folder holding requirements.lock's torch as a CPU wheel for CPython 3.11."""
    version = locked_version("requirements.lock", "torch")
    for folder in pip_find_links():
        if any(folder.glob(f"torch-{version}+cpu-cp311-cp311-*.whl")):
            return folder
    return None


@contextlib.contextmanager
def served(folder: Path) -> Iterator[str]:
    """``folder`` over HTTP on loopback (a pip --find-links page) while the block runs."""
    port = free_port()
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def build(env: dict[str, str], name: str, build_args: dict[str, str]) -> dict[str, object]:
    dockerfile, tag = image_tags()[name]
    argv = ["docker", "build", "--network", "host", "-f", dockerfile, "-t", tag]
    for key, value in build_args.items():
        argv += ["--build-arg", f"{key}={value}"]
    print(f">> docker build {tag} ({dockerfile})", flush=True)
    seconds = run_streaming([*argv, str(REPO_ROOT)], env, REPORT.parent / f"{name}.log")
    size = image_size(env, tag)
    print(f"   {tag}: {seconds:.0f} s, {size / 1e6:.0f} MB", flush=True)
    return {"tag": tag, "build_s": round(seconds, 1), "size_mb": round(size / 1e6, 1)}


def check_gateway(env: dict[str, str], tag: str) -> dict[str, object]:
    """The gateway image runs as a non-root UID and holds no training stack or test tool."""
    user = docker(env, "image", "inspect", "--format", "{{.Config.User}}", tag).stdout.strip()
    if not user or user.split(":")[0] in {"0", "root"}:
        raise SystemExit(f"{tag} runs as root ({user!r})")
    probe = (
        "import importlib.util as u, json; "
        f"print(json.dumps([m for m in {list(NOT_IN_GATEWAY)!r} if u.find_spec(m)]))"
    )
    found = docker(
        env, "run", "--rm", "--network", "none", tag, "python", "-c", probe
    ).stdout.strip()
    if json.loads(found):
        raise SystemExit(f"{tag} carries {found}")
    return {"user": user, "absent": list(NOT_IN_GATEWAY)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=["gateway", "training", "mlflow"])
    parser.add_argument("--triton", action="store_true", help="also the Triton image")
    args = parser.parse_args(argv)
    names = args.only or ["gateway", "training", "mlflow"]
    names += ["triton"] if args.triton else []
    report: dict[str, dict[str, object]] = {}
    with docker_engine() as env:
        base, base_s = python_base(env)
        report["base"] = {"image": base, "build_s": round(base_s, 1)}
        if base == LOCAL_BASE:
            report["base"]["size_mb"] = round(image_size(env, base) / 1e6, 1)
        common = {"PYTHON_IMAGE": base}
        if os.environ.get("PIP_INDEX_URL"):
            common["PIP_INDEX_URL"] = os.environ["PIP_INDEX_URL"]
        for name in names:
            build_args = dict(common) if name != "triton" else {}
            wheels = local_torch_wheels() if name == "training" else None
            with served(wheels) if wheels else contextlib.nullcontext("") as links:
                if links:
                    build_args["TORCH_FIND_LINKS"] = links
                report[name] = build(env, name, build_args)
            if name == "gateway":
                report[name].update(check_gateway(env, image_tags()[name][1]))
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    earlier = json.loads(REPORT.read_text()) if REPORT.is_file() else {}
    REPORT.write_text(json.dumps({**earlier, **report}, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
