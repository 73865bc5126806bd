"""A pod's container as ``docker run`` arguments, derived from the rendered manifests.

``make container-smoke`` starts the gateway image the way the kubelet would: the pod's and the
container's securityContext (UID and GID, fsGroup, read-only root, no privilege escalation,
dropped capabilities), its resource limits, the environment of its ConfigMaps, Secrets and
``env`` entries, and every volume at the path and with the mode the manifest mounts it
(emptyDir as tmpfs, claims as host folders owned by the pod's fsGroup, Secrets and
ConfigMaps as read-only files). Nothing here is hard-coded per workload: what the manifests
change, the smoke follows (tests/ops/test_pod_container.py holds it to that).
"""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")
_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}


class ManifestError(ValueError):
    """The manifests ask for something a container run cannot reproduce."""


@dataclass
class HostDir:
    """A folder on the host that stands in for a volume: its files, owner and mode."""

    path: Path
    files: dict[str, bytes] = field(default_factory=dict)
    uid: int | None = None
    gid: int | None = None


@dataclass
class ContainerRun:
    image: str
    options: list[str]
    command: list[str]
    env: dict[str, str]
    host_dirs: list[HostDir]
    overridden: list[str]

    def argv(self, name: str) -> list[str]:
        """``docker run`` for this container, detached, named ``name``."""
        env = [a for k, v in sorted(self.env.items()) for a in ("--env", f"{k}={v}")]
        entry = ["--entrypoint", self.command[0]] if self.command else []
        args = self.command[1:] if self.command else []
        return ["docker", "run", "--detach", "--name", name, *self.options, *env, *entry,
                self.image, *args]  # fmt: skip


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity ("1Gi", "250m", "2") as a number (bytes, cores)."""
    text = str(value)
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    for suffix, factor in _UNITS.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def find(docs: Sequence[dict[str, Any]], kinds: Sequence[str], name: str) -> dict[str, Any]:
    found = [d for d in docs if d.get("kind") in kinds and d["metadata"]["name"] == name]
    if len(found) != 1:
        raise ManifestError(f"{len(found)} objects of kind {'/'.join(kinds)} named {name!r}")
    return found[0]


def _data(obj: dict[str, Any]) -> dict[str, bytes]:
    """A ConfigMap's or Secret's data as bytes (Secrets are base64, stringData is not)."""
    out = {k: v.encode() for k, v in obj.get("stringData", {}).items()}
    if obj["kind"] == "Secret":
        out.update({k: base64.b64decode(v) for k, v in obj.get("data", {}).items()})
    else:
        out.update({k: v.encode() for k, v in obj.get("data", {}).items()})
        out.update({k: base64.b64decode(v) for k, v in obj.get("binaryData", {}).items()})
    return out


def _source(
    docs: Sequence[dict[str, Any]], kind: str, name: str, placeholder: bool
) -> dict[str, bytes] | None:
    """The data of a rendered ConfigMap or Secret; None (placeholders) if created out of band."""
    for d in docs:
        if d.get("kind") == kind and d["metadata"]["name"] == name:
            return _data(d)
    if placeholder:
        return None
    raise ManifestError(f"{kind} {name!r} is referenced but not rendered")


def environment(docs: Sequence[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom first, then env."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key in source:
                data = _source(docs, kind, source[key]["name"], placeholder=kind == "Secret")
                env.update({prefix + k: v.decode() for k, v in (data or {}).items()})
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
            continue
        ref = entry.get("valueFrom", {})
        for kind, key in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
            if key in ref:
                data = _source(docs, kind, ref[key]["name"], placeholder=True)
                value = (data or {}).get(ref[key]["key"])
                env[entry["name"]] = value.decode() if value is not None else "container-smoke"
        if "fieldRef" in ref or "resourceFieldRef" in ref:
            env[entry["name"]] = "container-smoke"
    return env


def _volume_options(
    docs: Sequence[dict[str, Any]],
    workload: dict[str, Any],
    container: dict[str, Any],
    volumes_root: Path,
    uid: int,
    fs_group: int | None,
) -> tuple[list[str], list[HostDir]]:
    pod = workload["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
    options: list[str] = []
    host_dirs: list[HostDir] = []
    for mount in container.get("volumeMounts", []):
        name, target = mount["name"], mount["mountPath"]
        readonly = ",readonly" if mount.get("readOnly") else ""
        volume = volumes.get(name, {})
        if "emptyDir" in volume:
            if mount.get("subPath"):
                raise ManifestError(f"volume {name}: subPath of an emptyDir")
            size = volume["emptyDir"].get("sizeLimit")
            limit = f",tmpfs-size={int(quantity(size))}" if size else ""
            options += ["--mount", f"type=tmpfs,dst={target},tmpfs-mode=1777{limit}{readonly}"]
            continue
        host = HostDir(volumes_root / name)
        if name in claims or "persistentVolumeClaim" in volume:
            # A fresh claim is an empty folder the pod's fsGroup can write.
            host.uid, host.gid = uid, fs_group if fs_group is not None else uid
        elif "secret" in volume or "configMap" in volume:
            kind, key = ("Secret", "secret") if "secret" in volume else ("ConfigMap", "configMap")
            ref = volume[key].get("secretName") or volume[key].get("name")
            data = _source(docs, kind, ref, placeholder=True) or {}
            items = volume[key].get("items")
            host.files = {i["path"]: data[i["key"]] for i in items} if items else data
            readonly = ",readonly"  # the kubelet mounts both read-only
        else:
            raise ManifestError(f"volume {name}: {sorted(volume) or 'undeclared'} not supported")
        source = host.path / mount["subPath"] if mount.get("subPath") else host.path
        options += ["--mount", f"type=bind,src={source},dst={target}{readonly}"]
        host_dirs.append(host)
    return options, host_dirs


def container_run(
    docs: Sequence[dict[str, Any]],
    workload_name: str,
    container_name: str,
    volumes_root: Path,
    overrides: dict[str, str] | None = None,
) -> ContainerRun:
    """``docker run`` of one container of a rendered workload, on the host's network.

    ``overrides`` replaces environment values that name cluster addresses and ports (the
    local stack's instead); every other value is the manifests'.
    """
    workload = find(docs, WORKLOAD_KINDS, workload_name)
    pod = workload["spec"]["template"]["spec"]
    container = next((c for c in pod["containers"] if c["name"] == container_name), None)
    if container is None:
        raise ManifestError(f"{workload_name} has no container {container_name!r}")
    pod_sc, sc = pod.get("securityContext", {}), container.get("securityContext", {})
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    gid = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
    if uid is None:
        raise ManifestError(f"{workload_name}: no runAsUser (the image's user would run)")
    fs_group = pod_sc.get("fsGroup")
    options = ["--network", "host", "--user", f"{uid}:{gid}" if gid is not None else str(uid)]
    for group in [fs_group, *pod_sc.get("supplementalGroups", [])]:
        if group is not None:
            options += ["--group-add", str(group)]
    if sc.get("readOnlyRootFilesystem"):
        options.append("--read-only")
    if sc.get("allowPrivilegeEscalation") is False:
        options += ["--security-opt", "no-new-privileges"]
    if sc.get("privileged"):
        options.append("--privileged")
    capabilities = sc.get("capabilities", {})
    options += [a for cap in capabilities.get("drop", []) for a in ("--cap-drop", cap)]
    options += [a for cap in capabilities.get("add", []) for a in ("--cap-add", cap)]
    seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
    if seccomp == "Unconfined":
        options += ["--security-opt", "seccomp=unconfined"]
    limits = container.get("resources", {}).get("limits", {})
    if "memory" in limits:
        options += ["--memory", str(int(quantity(limits["memory"])))]
    if "cpu" in limits:
        options += ["--cpus", f"{quantity(limits['cpu']):g}"]
    if container.get("workingDir"):
        options += ["--workdir", container["workingDir"]]
    mounts, host_dirs = _volume_options(docs, workload, container, volumes_root, int(uid), fs_group)
    env = environment(docs, container)
    overrides = overrides or {}
    env.update(overrides)
    command = [*container.get("command", []), *container.get("args", [])]
    return ContainerRun(
        image=container["image"],
        options=options + mounts,
        command=command,
        env=env,
        host_dirs=host_dirs,
        overridden=sorted(overrides),
    )


def prepare(host_dirs: Sequence[HostDir]) -> None:
    """Create the host folders (emptied first): files written, owner set as the pod's."""
    for host in host_dirs:
        if host.path.exists():
            shutil.rmtree(host.path)
        host.path.mkdir(parents=True)
        for name, content in host.files.items():
            (host.path / name).parent.mkdir(parents=True, exist_ok=True)
            (host.path / name).write_bytes(content)
            (host.path / name).chmod(0o444)
        if host.uid is not None:
            os.chown(host.path, host.uid, host.gid if host.gid is not None else host.uid)
            host.path.chmod(0o2770)
        else:
            host.path.chmod(0o755)
