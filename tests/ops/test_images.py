"""`make images` without a Docker engine: the tags it builds are the manifests', every
Dockerfile defaults to the same digest-pinned base, and the local torch wheel reaches the
build over loopback."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pytest

from ops.docker_engine import dockerd_argv
from ops.images import image_tags, local_torch_wheels, locked_version, served, upstream_base

DOCKER = Path(__file__).resolve().parents[2] / "docker"


def test_every_python_image_defaults_to_the_same_pinned_base() -> None:
    base = upstream_base()
    assert re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", base), base
    for name in ("gateway", "training", "mlflow"):
        text = (DOCKER / f"{name}.Dockerfile").read_text()
        assert f"ARG PYTHON_IMAGE={base}\n" in text, name


def test_tags_are_what_the_manifests_deploy() -> None:
    tags = image_tags()
    assert tags["gateway"][1] == "recsys/gateway:0.1.0"
    assert (
        tags["mlflow"][1] == f"recsys/mlflow:{locked_version('requirements-mlflow.lock', 'mlflow')}"
    )
    for dockerfile, _ in tags.values():
        assert (DOCKER.parent / dockerfile).is_file(), dockerfile


def test_local_torch_wheel_is_found_and_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = locked_version("requirements.lock", "torch")
    wheel = tmp_path / f"torch-{version}+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    wheel.write_bytes(b"not really a wheel")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    assert local_torch_wheels() == tmp_path
    with served(tmp_path) as url:
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url + wheel.name.replace("+", "%2B"), timeout=5) as reply:
            assert reply.read() == b"not really a wheel"


def test_own_daemon_uses_the_host_network_only(tmp_path: Path) -> None:
    argv = dockerd_argv(tmp_path)
    assert {"--iptables=false", "--bridge=none"} <= set(argv)
    assert argv[argv.index("-p") + 1] == str(tmp_path / "dockerd.pid")
    assert argv[argv.index("-H") + 1] == f"unix://{tmp_path / 'docker.sock'}"
