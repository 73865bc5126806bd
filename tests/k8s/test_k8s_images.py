"""Dockerfiles agree with the manifests and the Python package, and the entrypoints they run
exist and start. (`make images` builds them and `make container-smoke` starts the gateway's;
these checks are the static half, run by `make test`.)"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
from k8s_helpers import DOCKER_DIR, REPO_ROOT, Rendered, containers, pod_templates

# A floating tag (3.11 moves with every patch release) is pinned by its digest.
PYTHON_BASE = re.compile(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}")
TRITON_BASE = "nvcr.io/nvidia/tritonserver:24.10-py3"
# image repository (without registry) -> Dockerfile that builds it
IMAGES = {
    "recsys/gateway": "gateway.Dockerfile",
    "recsys/training": "training.Dockerfile",
    "recsys/triton": "triton.Dockerfile",
    "recsys/mlflow": "mlflow.Dockerfile",
}
# Modules the images run (a missing one fails: a deleted entry point must not pass).
ENTRYPOINT_MODULES = {
    "services.gateway": ["services/gateway/__main__.py"],
    "services.profile_worker": ["services/profile_worker/__main__.py"],
    "training.train": ["training/train.py"],
    "training.export": ["training/export/__main__.py", "training/export.py"],
}


def dockerfile(name: str) -> str:
    return (DOCKER_DIR / name).read_text()


def copy_sources(text: str) -> set[str]:
    """What the Dockerfile copies from the build context (not from other stages)."""
    return {
        source.rstrip("/")
        for rest in arguments(text, "COPY")
        if not rest.startswith("--from")
        for source in rest.split()[:-1]
    }


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def arguments(text: str, keyword: str) -> list[str]:
    return [rest for kw, rest in instructions(text) if kw == keyword]


def _arg_default(rest: str) -> tuple[str, str]:
    """``NAME=default`` of an ``ARG`` instruction -> (NAME, default)."""
    match = re.match(r"(\w+)=(\S*)", rest)
    assert match is not None, rest
    return match[1], match[2]


def base_images(text: str) -> list[str]:
    args = dict(
        _arg_default(rest)
        for keyword, rest in instructions(text)
        if keyword == "ARG" and "=" in rest
    )
    images = []
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            image = rest.split()[0]
            images.append(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image))
    return images


def image_repository(image: str) -> str:
    """registry.example.com/recsys/gateway:0.1.0 -> recsys/gateway."""
    name = image.split("@")[0].rsplit(":", 1)[0]
    parts = name.split("/")
    return "/".join(parts[-2:])


# What "pinned" means: a digest, or a tag that names one immutable release. A full version
# (1.2.3, v2.6.11, 0.1.0-cu128, 2.15.1-alpine) or NVIDIA's monthly release (24.10-py3, YY.MM).
# Floating tags (latest, 3.11, 3.11-slim-bookworm, stable, main) move under the same name.
_DIGEST = re.compile(r"@sha256:[0-9a-f]{64}")
_RELEASE_TAG = re.compile(r"v?\d+\.\d+\.\d+(?:[-+.][\w.-]+)?|\d{2}\.\d{2}-py3")


def pinned(image: str) -> bool:
    if _DIGEST.search(image):
        return True
    last = image.split("/")[-1]
    return ":" in last and bool(_RELEASE_TAG.fullmatch(last.rsplit(":", 1)[1]))


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("python:3.11-slim-bookworm", False),
        ("python:3.11", False),
        ("nats:latest", False),
        ("nats", False),
        ("registry.example.com:5000/recsys/gateway", False),
        ("milvusdb/milvus:v2.6", False),
        ("milvusdb/milvus:v2.6.11", True),
        ("nats:2.15.1-alpine", True),
        ("registry.example.com:5000/recsys/training:0.1.0-cu128", True),
        ("nvcr.io/nvidia/tritonserver:24.10-py3", True),
        ("python:3.11-slim-bookworm@sha256:" + "0" * 64, True),
    ],
)
def test_pinned_means_digest_or_release(image: str, expected: bool) -> None:
    assert pinned(image) is expected


def project_version() -> str:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]


# --- Dockerfiles -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(IMAGES.values()))
def test_dockerfile_bases_pinned_and_user_non_root(name: str) -> None:
    text = dockerfile(name)
    for image in base_images(text):
        if image in {"build"}:  # a stage name
            continue
        assert pinned(image), f"{name}: base {image} is neither a digest nor a release"
    users = arguments(text, "USER")
    assert users, f"{name} never leaves root"
    assert users[-1].split(":")[0] not in {"root", "0"}, f"{name} runs as {users[-1]}"


@pytest.mark.parametrize("name", ["gateway.Dockerfile", "training.Dockerfile"])
def test_python_images(name: str) -> None:
    text = dockerfile(name)
    bases = base_images(text)
    assert len(bases) >= 2 and len(set(bases)) == 1, f"{name}: multi-stage on {bases}"
    assert PYTHON_BASE.fullmatch(bases[0]), f"{name}: base {bases[0]} not pinned by digest"
    args = " ".join(arguments(text, "ARG"))
    for build_arg in ("PYTHON_IMAGE=", "PIP_INDEX_URL=", "PIP_CERT="):
        assert build_arg in args, f"{name}: {build_arg} is a build argument"
    runs = " ".join(arguments(text, "RUN"))
    assert "grpc_tools.protoc" in runs, f"{name}: the stubs are generated in the build"
    assert "COPY --from=build" in text
    runs = " ".join(arguments(text, "RUN"))
    assert "pip install --no-deps ." in runs
    assert re.search(r"USER\s+10001", text), "pods run as UID 10001 (runAsUser)"


def test_training_image_installs_the_full_lock() -> None:
    text = dockerfile("training.Dockerfile")
    runs = " ".join(arguments(text, "RUN"))
    assert "pip install --no-deps -r" in runs, "dependencies must come from requirements.lock"
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in runs
    copied = copy_sources(text)
    # training/ and the ops/ jobs, on core/; the jobs use services' store and clients
    assert {"requirements.lock", "core", "services", "training", "ops"} <= copied, copied


def test_gateway_image_installs_only_the_gateway_lock() -> None:
    """The gateway image gets requirements-gateway.lock (hashed pins), core/ and services/:
    no torch (nor any other training or dev package), no training/ or ops/ code."""
    text = dockerfile("gateway.Dockerfile")
    runs = " ".join(arguments(text, "RUN"))
    assert "pip install --require-hashes --no-deps -r requirements-gateway.lock" in runs, (
        "dependencies must come from requirements-gateway.lock, hashes checked"
    )
    copied = copy_sources(text)
    assert copied == {
        "requirements-gateway.lock",
        "requirements-build.lock",
        "pyproject.toml",
        "README.md",
        "proto",
        "core",
        "services",
    }, f"gateway image copies {sorted(copied)}"
    assert "requirements.lock" not in text.replace("requirements-gateway.lock", "")
    assert "torch" not in runs and "download.pytorch.org" not in runs, "no torch in the gateway"


def test_triton_image() -> None:
    text = dockerfile("triton.Dockerfile")
    assert base_images(text) == [TRITON_BASE]
    runs = " ".join(arguments(text, "RUN"))
    pins = dict(re.findall(r'"([\w-]+)==([^"]+)"', runs))
    assert set(pins) >= {"numpy", "onnxruntime", "tokenizers", "openvino"}, pins
    assert pins["numpy"].startswith("1."), "the python backend needs numpy<2"
    lock = REPO_ROOT / "requirements-triton.lock"  # a deleted lock fails here, never skips
    locked = dict(re.findall(r"^([\w-]+)==(\S+)", lock.read_text(), re.M))
    for package in ("numpy", "tokenizers", "openvino"):
        assert pins[package] == locked.get(package), f"{package}: image != {lock.name}"


@pytest.mark.parametrize("name", sorted(IMAGES.values()))
def test_copy_sources_exist_and_are_in_context(name: str) -> None:
    ignore = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    allowed = [p[1:].rstrip("/") for p in ignore if p.startswith("!")]
    for keyword, rest in instructions(dockerfile(name)):
        if keyword != "COPY" or rest.startswith("--from"):
            continue
        for source in rest.split()[:-1]:
            source = source.rstrip("/")
            assert any(source == a or fnmatch(source, a) for a in allowed), (
                f"{name}: COPY {source} is excluded by .dockerignore"
            )
            assert (REPO_ROOT / source).exists(), f"{name}: COPY {source} does not exist"


def test_dockerignore_keeps_weights_and_state_out() -> None:
    text = (REPO_ROOT / ".dockerignore").read_text()
    assert text.splitlines()[1:2] == ["*"] or "\n*\n" in text, "allow-list context expected"
    for pattern in ("model_repository/*/[0-9]*/", "model_repository/*/tokenizer/"):
        assert pattern in text


# --- manifests <-> images ----------------------------------------------------------------


def test_manifest_images_are_built_here_or_pinned(overlay: Rendered) -> None:
    version = project_version()
    for obj in overlay.docs:
        for label, template in pod_templates(obj) if "spec" in obj else []:
            for c in containers(template):
                image = c["image"]
                repo = image_repository(image)
                tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else ""
                assert pinned(image), f"{obj['kind']} {label}: {image} not pinned"
                if repo in ("recsys/gateway", "recsys/training"):
                    assert tag.split("-")[0] == version, f"{image}: tag != pyproject {version}"
                if repo.startswith("recsys/"):
                    assert repo in IMAGES, f"{image} has no Dockerfile in docker/"
    milvus = overlay.get("Milvus", "milvus")["spec"]["components"]["image"]
    assert pinned(milvus) and milvus.startswith("milvusdb/milvus:"), milvus


def test_gateway_command_matches_image(overlay: Rendered) -> None:
    gateway = overlay.workload("gateway")
    command = gateway["spec"]["template"]["spec"]["containers"][0]["command"]
    cmd = [
        rest for keyword, rest in instructions(dockerfile("gateway.Dockerfile")) if keyword == "CMD"
    ]
    assert cmd and eval(cmd[-1]) == command


def test_triton_image_tag_matches_base(overlay: Rendered) -> None:
    image = overlay.workload("triton")["spec"]["template"]["spec"]["containers"][0]
    assert image["image"].rsplit(":", 1)[1] == TRITON_BASE.rsplit(":", 1)[1]


# --- entrypoints -------------------------------------------------------------------------


@pytest.mark.parametrize("module", sorted(ENTRYPOINT_MODULES))
def test_entrypoint_module_exists(module: str) -> None:
    files = ENTRYPOINT_MODULES[module]
    assert any((REPO_ROOT / f).is_file() for f in files), f"{module}: none of {files}"
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    assert importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("module", ["training.train", "training.export"])
def test_training_entrypoint_help(module: str) -> None:
    files = ENTRYPOINT_MODULES[module]
    assert any((REPO_ROOT / f).is_file() for f in files), f"{module}: none of {files}"
    proc = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for flag in {
        "training.train": ["--config"],
        "training.export": ["--checkpoint", "--repository"],
    }[module]:
        assert flag in proc.stdout, f"{module} --help does not mention {flag}"


def test_module_paths_are_relative_to_app(overlay: Rendered) -> None:
    """The images run from /app, where the sources are copied (WORKDIR)."""
    for name in ("gateway.Dockerfile", "training.Dockerfile"):
        workdirs = [
            rest for keyword, rest in instructions(dockerfile(name)) if keyword == "WORKDIR"
        ]
        assert workdirs[-1] == "/app", name
    entrypoint = overlay.get("RayJob", "recsys-train")["spec"]["entrypoint"]
    assert "cd /app" in entrypoint
    assert Path("/app/model_repository").name in entrypoint


def test_mlflow_server_is_the_training_client_version(overlay: Rendered) -> None:
    """The tracking server image (full mlflow, requirements-mlflow.lock) and its tag are the
    version of the client the training image logs with (mlflow-skinny, requirements.lock)."""
    locked = dict(
        re.findall(r"^([\w.-]+)==(\S+)", (REPO_ROOT / "requirements.lock").read_text(), re.M)
    )
    server = dict(
        re.findall(r"^([\w.-]+)==(\S+)", (REPO_ROOT / "requirements-mlflow.lock").read_text(), re.M)
    )
    client = locked["mlflow-skinny"]
    assert server["mlflow"] == server["mlflow-skinny"] == client
    text = dockerfile("mlflow.Dockerfile")
    assert "pip install --no-deps -r requirements-mlflow.lock" in " ".join(arguments(text, "RUN"))
    image = overlay.workload("mlflow")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image_repository(image) == "recsys/mlflow" and image.rsplit(":", 1)[1] == client
