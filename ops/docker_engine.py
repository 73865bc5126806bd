"""A Docker engine for ``make images`` and ``make container-smoke``.

The engine ``DOCKER_HOST`` names when it answers; else a ``dockerd`` of our own under
``var/docker`` (no iptables, no bridge: builds and containers use the host's network, the
only way out to the package index on a machine like this one), stopped by its PID on exit.
The legacy builder is used (``DOCKER_BUILDKIT=0``): BuildKit is not available everywhere.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from core.config import REPO_ROOT
from ops.processes import ManagedProcess, StartupError

ENGINE_ROOT = REPO_ROOT / "var" / "docker"


def answers(env: dict[str, str]) -> bool:
    """True when the engine ``env`` points at answers ``docker version``."""
    try:
        proc = subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}}"],
            env=env,
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def ensure_installed(*tools: str) -> None:
    """Debian's docker.io (dockerd and the client) and debootstrap, when missing."""
    packages = {"docker": "docker.io", "dockerd": "docker.io", "debootstrap": "debootstrap"}
    missing = sorted({packages[t] for t in tools if shutil.which(t) is None})
    if missing:
        print(f">> installing {' '.join(missing)} (Debian)", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True)


def dockerd_argv(root: Path) -> list[str]:
    return [
        "dockerd",
        "--iptables=false",
        "--bridge=none",
        "--data-root",
        str(root / "data"),
        "--exec-root",
        str(root / "exec"),
        "-H",
        f"unix://{root / 'docker.sock'}",
        "-p",
        str(root / "dockerd.pid"),
    ]


@contextlib.contextmanager
def docker_engine(root: Path = ENGINE_ROOT, timeout: float = 60) -> Iterator[dict[str, str]]:
    """The environment (``DOCKER_HOST``, ``DOCKER_BUILDKIT=0``) of a running engine."""
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    if env.get("DOCKER_HOST") and answers(env):
        yield env
        return
    ensure_installed("docker", "dockerd")
    env["DOCKER_HOST"] = f"unix://{root / 'docker.sock'}"
    if answers(env):  # one of ours from an earlier run is still up: use it, leave it up
        yield env
        return
    root.mkdir(parents=True, exist_ok=True)
    (root / "dockerd.pid").unlink(missing_ok=True)
    daemon = ManagedProcess("dockerd", dockerd_argv(root), root / "dockerd.log").start()
    try:
        daemon.wait_ready(lambda: answers(env), timeout)
        print(f">> dockerd (pid {daemon.pid}) on {env['DOCKER_HOST']}", flush=True)
        yield env
    finally:
        daemon.stop(grace=30)


def docker(
    env: dict[str, str], *args: str, check: bool = True, timeout: float | None = None
) -> subprocess.CompletedProcess[str]:
    """``docker ARGS`` against the engine of ``env``, output captured."""
    proc = subprocess.run(
        ["docker", *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise StartupError(f"docker {' '.join(args[:3])} ... failed:\n{proc.stderr[-3000:]}")
    return proc


def image_exists(env: dict[str, str], tag: str) -> bool:
    return docker(env, "image", "inspect", tag, check=False).returncode == 0


def image_size(env: dict[str, str], tag: str) -> int:
    return int(docker(env, "image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())


def run_streaming(argv: Sequence[str], env: dict[str, str], log: Path) -> float:
    """Run ``argv`` with its output to ``log``; seconds taken. Fails with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.run(list(argv), env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise StartupError(f"{' '.join(argv[:4])} ... failed (log {log}):\n{tail}")
    return time.monotonic() - started
