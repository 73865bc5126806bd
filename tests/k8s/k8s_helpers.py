"""Helpers shared by the static Kubernetes checks (imported by conftest and the tests).

Everything here works offline: overlays are rendered with ``kubectl kustomize`` (kustomize is
built into kubectl), nothing talks to a cluster. Rendering, CRD loading and the checkov scan
are session-scoped so the whole directory runs in seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "k8s"
OVERLAYS_DIR = K8S_DIR / "overlays"
COMPONENTS_DIR = K8S_DIR / "components"
DOCKER_DIR = REPO_ROOT / "docker"

# Overlays every deployment must have; more may be added and are picked up automatically.
REQUIRED_OVERLAYS = ("dev", "prod")
# Components are tested only through the overlays that apply them (the files users apply):
# no throw-away wrapper kustomization that could render differently.
# Custom resources and the operator CRD that validates each (files in RECSYS_CRD_DIR).
CRD_FILES = {
    ("ray.io", "RayJob"): "ray.io_rayjobs.yaml",
    ("milvus.io", "Milvus"): "milvus.io_milvuses.yaml",
}
# Secrets the prod overlay does not render: its ExternalSecrets and Certificate
# (components/prod-operations) make them in the cluster (k8s/README.md).
_PROD_SECRETS = {
    "milvus-credentials",
    "milvus-root",
    "gateway-api-keys",
    "gateway-tls",
    "gateway-pseudonym-key",
}
EXTERNAL_SECRETS = {"prod": _PROD_SECRETS, "prod-autoscaled": _PROD_SECRETS}

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}


def overlay_names() -> list[str]:
    found = sorted(p.parent.name for p in OVERLAYS_DIR.glob("*/kustomization.yaml"))
    return found or list(REQUIRED_OVERLAYS)


def variant_names() -> list[str]:
    return overlay_names()


@dataclass
class Rendered:
    """One rendered overlay: its documents plus lookup helpers. ``docs`` are what a user
    applies for it: the namespace (``<overlay>/namespace``), the serving overlay and its
    training run (``<overlay>/training``); the three lists keep them apart, as the three
    separate ``kubectl apply -k`` they are."""

    name: str
    text: str
    docs: list[dict[str, Any]] = field(default_factory=list)
    serving: list[dict[str, Any]] = field(default_factory=list)
    training: list[dict[str, Any]] = field(default_factory=list)
    namespaces: list[dict[str, Any]] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d.get("kind") == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        """The object of this kind whose name is ``name`` (or ``name-<hash>`` if generated)."""
        for d in self.of_kind(kind):
            n = d["metadata"]["name"]
            if n == name or n.rsplit("-", 1)[0] == name:
                return d
        raise AssertionError(f"{self.name}: no {kind} named {name!r}")

    def workload(self, name: str) -> dict[str, Any]:
        """The one workload (Deployment, StatefulSet, ...) called ``name``, whatever its kind."""
        found = [
            d
            for d in self.docs
            if d.get("kind") in WORKLOAD_KINDS and d["metadata"]["name"] == name
        ]
        assert len(found) == 1, f"{self.name}: {len(found)} workloads named {name!r}"
        return found[0]

    def has(self, kind: str, name: str) -> bool:
        try:
            self.get(kind, name)
        except AssertionError:
            return False
        return True

    @property
    def namespace(self) -> str:
        namespaces = {d["metadata"]["name"] for d in self.of_kind("Namespace")}
        assert len(namespaces) == 1, f"{self.name}: expected one Namespace, got {namespaces}"
        return namespaces.pop()


def pod_templates(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(label, pod template) for every pod template in a workload or a RayJob."""
    kind = obj["kind"]
    spec = obj.get("spec", {})
    if kind in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
        yield obj["metadata"]["name"], spec["template"]
    elif kind == "CronJob":
        yield obj["metadata"]["name"], spec["jobTemplate"]["spec"]["template"]
    elif kind == "RayJob":
        cluster = spec["rayClusterSpec"]
        yield "head", cluster["headGroupSpec"]["template"]
        for group in cluster.get("workerGroupSpecs", []):
            yield group["groupName"], group["template"]


def containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    spec = template["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def env_values(rendered: Rendered, container: dict[str, Any]) -> dict[str, Any]:
    """Effective environment of a container: envFrom ConfigMaps, then env entries.

    Plain values are strings; ``valueFrom`` entries are returned as their source dict.
    """
    values: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            cm = rendered.get("ConfigMap", source["configMapRef"]["name"])
            prefix = source.get("prefix", "")
            values.update({prefix + k: v for k, v in cm.get("data", {}).items()})
        if "secretRef" in source:
            values.setdefault("__secretRefs__", []).append(source["secretRef"]["name"])
    for entry in container.get("env", []):
        values[entry["name"]] = entry["value"] if "value" in entry else entry["valueFrom"]
    return values


def operator_secrets(rendered: Rendered) -> dict[str, set[str]]:
    """Secret name -> keys, for the Secrets an operator writes from a rendered resource:
    External Secrets Operator (an ExternalSecret's target) and cert-manager (a Certificate's
    secretName: tls.crt, tls.key, ca.crt)."""
    out: dict[str, set[str]] = {}
    for es in rendered.of_kind("ExternalSecret"):
        spec = es["spec"]
        name = spec.get("target", {}).get("name", es["metadata"]["name"])
        template = spec.get("target", {}).get("template", {}).get("data")
        keys = set(template) if template else {d["secretKey"] for d in spec.get("data", [])}
        out[name] = keys
    for cert in rendered.of_kind("Certificate"):
        out[cert["spec"]["secretName"]] = {"tls.crt", "tls.key", "ca.crt"}
    return out


def render(path: Path) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail(
            "kubectl not found on PATH: the manifest tests render overlays with "
            "`kubectl kustomize` (offline). Install it, e.g. `apt-get install -y kubectl`.",
            pytrace=False,
        )
    proc = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        pytest.fail(f"`kubectl kustomize {path}` failed:\n{proc.stderr}", pytrace=False)
    return proc.stdout


def render_variant(name: str, tmp_root: Path) -> str:
    return render(OVERLAYS_DIR / name)


def crd_dir() -> Path | None:
    """Upstream operator CRDs: $RECSYS_CRD_DIR, else ../shared/crds next to the repo."""
    configured = os.environ.get("RECSYS_CRD_DIR")
    path = Path(configured) if configured else REPO_ROOT.parent / "shared" / "crds"
    return path if path.is_dir() else None
