"""Manifests agree with the code: settings, ports, probes, wiring between components."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from k8s_helpers import (
    EXTERNAL_SECRETS,
    REPO_ROOT,
    WORKLOAD_KINDS,
    Rendered,
    containers,
    env_values,
    operator_secrets,
    pod_templates,
)
from pydantic import BaseModel, SecretStr

ENV_PREFIX = "RECSYS_"
SERVICE_NAME = "recsys.v1.RecommenderService"  # the readiness health service
TRITON_IMAGE_TAG = "24.10-py3"


# --- helpers -----------------------------------------------------------------------------


def container(rendered: Rendered, name: str, index: int = 0) -> dict[str, Any]:
    """Container ``index`` of the workload ``name`` (Deployment or StatefulSet alike)."""
    return rendered.workload(name)["spec"]["template"]["spec"]["containers"][index]


def named_port(c: dict[str, Any], name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    assert name in ports, f"container {c['name']} has no port named {name}"
    return ports[name]


def probe_port(c: dict[str, Any], probe: dict[str, Any]) -> int:
    port = next(iter(v for k, v in probe.items() if k in ("grpc", "httpGet", "tcpSocket")))
    value = port["port"]
    return named_port(c, value) if isinstance(value, str) else value


def health_check(c: dict[str, Any], probe: dict[str, Any]) -> tuple[int, str]:
    """(port, grpc.health.v1 service name) a gateway probe asks: a native gRPC probe only
    (an exec probe would start a Python process per probe, every few seconds, in every pod)."""
    assert "grpc" in probe and "exec" not in probe, f"gateway probe must be native gRPC: {probe}"
    return probe_port(c, probe), probe["grpc"].get("service", "")


def secret_mounts(template: dict[str, Any], c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> {secret, files: {file name: key}, readOnly} for the Secret volumes of c."""
    volumes = {v["name"]: v["secret"] for v in template["spec"].get("volumes", []) if "secret" in v}
    out = {}
    for mount in c.get("volumeMounts", []):
        secret = volumes.get(mount["name"])
        if secret is None:
            continue
        assert "subPath" not in mount, "subPath mounts of Secrets never see a rotation"
        files = {item["path"]: item["key"] for item in secret.get("items", [])}
        out[mount["mountPath"].rstrip("/")] = {
            "secret": secret["secretName"],
            "files": files,
            "readOnly": mount.get("readOnly", False),
        }
    return out


def secret_file(template: dict[str, Any], c: dict[str, Any], path: Path) -> tuple[str, str, bool]:
    """(Secret, key, read-only) that provide the file ``path`` inside container c."""
    mount = secret_mounts(template, c).get(str(path.parent))
    assert mount is not None, f"{path} is not in a mounted Secret volume"
    files = mount["files"]
    if files:
        assert path.name in files, f"{path}: the Secret volume's items do not project it"
        key = files[path.name]
    else:
        key = path.name
    return mount["secret"], key, mount["readOnly"]


def flag(args: list[str], name: str) -> str | None:
    prefix = f"--{name}="
    values = [a[len(prefix) :] for a in args if a.startswith(prefix)]
    assert len(values) <= 1, f"--{name} given twice"
    return values[0] if values else None


def recsys_containers(rendered: Rendered):
    """(where, container) for every container that runs this project's Python code."""
    workloads = [d for d in rendered.docs if d.get("kind") in WORKLOAD_KINDS | {"RayJob"}]
    for obj in workloads:
        for label, template in pod_templates(obj):
            for c in containers(template):
                if "/recsys/" in f"/{c['image']}" and "triton" not in c["image"]:
                    yield f"{obj['kind']}/{obj['metadata']['name']}/{label}/{c['name']}", c


def settings_from_env(settings_cls: type, env: dict[str, Any], monkeypatch) -> Any:
    for key in list(__import__("os").environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith(ENV_PREFIX) and isinstance(value, str):
            monkeypatch.setenv(key, value)
    return settings_cls()


def proto_service_names() -> set[str]:
    names = set()
    for proto in (REPO_ROOT / "proto").rglob("*.proto"):
        text = proto.read_text()
        package = re.search(r"^package\s+([\w.]+)\s*;", text, re.M)
        for service in re.findall(r"^service\s+(\w+)", text, re.M):
            names.add(f"{package.group(1)}.{service}" if package else service)
    return names


# --- settings ----------------------------------------------------------------------------


def test_every_recsys_variable_is_a_setting(
    overlay: Rendered, settings_cls: type[BaseModel]
) -> None:
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in settings_cls.model_fields}
    checked = [where for where, _ in recsys_containers(overlay)]
    assert any(w.startswith("Deployment/gateway/") for w in checked), checked
    unknown = {
        f"{where}: {key}"
        for where, c in recsys_containers(overlay)
        for key in env_values(overlay, c)
        if key.startswith(ENV_PREFIX) and key not in fields
    }
    for cm in overlay.of_kind("ConfigMap"):
        unknown |= {
            f"ConfigMap/{cm['metadata']['name']}: {key}"
            for key in cm.get("data", {})
            if key.startswith(ENV_PREFIX) and key not in fields
        }
    assert not unknown, "not fields of core.config.Settings:\n" + "\n".join(sorted(unknown))


def test_settings_parse(overlay: Rendered, settings_cls: type, monkeypatch) -> None:
    """The values the manifests set are valid for the Settings types and validators."""
    for _, c in recsys_containers(overlay):
        settings_from_env(settings_cls, env_values(overlay, c), monkeypatch)


def test_secret_settings_come_from_secrets(
    overlay: Rendered, settings_cls: type[BaseModel]
) -> None:
    secret_vars = {
        f"{ENV_PREFIX}{name.upper()}"
        for name, info in settings_cls.model_fields.items()
        if info.annotation is SecretStr
    }
    assert f"{ENV_PREFIX}MILVUS_TOKEN" in secret_vars
    for where, c in recsys_containers(overlay):
        for key, value in env_values(overlay, c).items():
            if key in secret_vars:
                assert isinstance(value, dict) and "secretKeyRef" in value, (
                    f"{where}: {key} must come from a Secret, not a literal/ConfigMap"
                )
    gateway_env = env_values(overlay, container(overlay, "gateway"))
    assert "secretKeyRef" in gateway_env[f"{ENV_PREFIX}MILVUS_TOKEN"]
    # One pseudonym key for every pod (an empty one would be random per process).
    assert "secretKeyRef" in gateway_env[f"{ENV_PREFIX}PSEUDONYM_KEY"]


def test_config_and_secret_references_resolve(overlay: Rendered) -> None:
    external = EXTERNAL_SECRETS.get(overlay.name, set())
    workloads = [d for d in overlay.docs if d.get("kind") in WORKLOAD_KINDS | {"RayJob"}]
    for obj in workloads:
        for _, template in pod_templates(obj):
            refs = []
            for volume in template["spec"].get("volumes", []):
                if "secret" in volume:
                    items = volume["secret"].get("items") or [{"key": None}]
                    refs += [("Secret", volume["secret"]["secretName"], i["key"]) for i in items]
                if "configMap" in volume:
                    items = volume["configMap"].get("items") or [{"key": None}]
                    refs += [("ConfigMap", volume["configMap"]["name"], i["key"]) for i in items]
            for c in containers(template):
                for entry in c.get("env", []):
                    source = entry.get("valueFrom", {})
                    for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                        if key in source:
                            refs.append((kind, source[key]["name"], source[key]["key"]))
                for source in c.get("envFrom", []):
                    for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                        if key in source:
                            refs.append((kind, source[key]["name"], None))
            for kind, name, key in refs:
                if kind == "Secret" and name in operator_secrets(overlay):
                    assert key is None or key in operator_secrets(overlay)[name], (
                        f"{overlay.name}: the operator-made Secret {name} has no key {key}"
                    )
                    continue
                if kind == "Secret" and name in external:
                    continue
                matches = [d for d in overlay.of_kind(kind) if d["metadata"]["name"] == name]
                assert matches, (
                    f"{overlay.name}: {obj['metadata']['name']} uses missing {kind} {name}"
                )
                if key is not None:
                    data = matches[0].get("data", {}) | matches[0].get("stringData", {})
                    assert key in data, f"{kind} {name} has no key {key}"


def test_external_secrets_are_documented() -> None:
    readme = (REPO_ROOT / "k8s" / "README.md").read_text()
    for names in EXTERNAL_SECRETS.values():
        for name in names:
            assert name in readme, f"k8s/README.md must say how to create Secret {name}"


# --- gateway -----------------------------------------------------------------------------

PROBES = ("startupProbe", "livenessProbe", "readinessProbe")
# The Secret keys a file setting must be read from: a kubernetes.io/tls Secret (+ ca.crt,
# as cert-manager writes it) for the TLS files.
TLS_KEYS = {"tls_cert_file": "tls.crt", "tls_key_file": "tls.key", "tls_client_ca_file": "ca.crt"}


def test_gateway_ports_probes_and_shutdown(overlay: Rendered, settings_cls, monkeypatch) -> None:
    gateway = overlay.workload("gateway")
    pod = gateway["spec"]["template"]
    c = pod["spec"]["containers"][0]
    settings = settings_from_env(settings_cls, env_values(overlay, c), monkeypatch)

    assert c["command"] == ["python", "-m", "services.gateway"]
    assert settings.grpc_host == "0.0.0.0", "RECSYS_GRPC_HOST must be 0.0.0.0 in a pod"
    assert named_port(c, "grpc") == settings.grpc_port
    assert named_port(c, "metrics") == settings.metrics_port != 0

    # The kubelet's native gRPC probe speaks plaintext: it probes the health-only port
    # (RECSYS_HEALTH_PORT, plaintext, same statuses), never the API port, which has TLS.
    assert settings.health_port != 0, "RECSYS_HEALTH_PORT must be set for the probes"
    assert settings.health_port != settings.grpc_port
    assert named_port(c, "health") == settings.health_port
    checks = {kind: health_check(c, c[kind]) for kind in PROBES}
    for kind, (port, _) in checks.items():
        assert port == settings.health_port, f"gateway {kind} must probe the health port"
    readiness_service = checks["readinessProbe"][1]
    assert readiness_service in proto_service_names(), readiness_service
    for kind in ("startupProbe", "livenessProbe"):
        assert checks[kind][1] != readiness_service, f"{kind} must not depend on Triton/Milvus"

    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == settings.metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"

    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > pre_stop + settings.grace_period_s + 5, (
        f"terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop}s + "
        f"RECSYS_GRACE_PERIOD_S {settings.grace_period_s}s with margin"
    )

    service = overlay.get("Service", "gateway")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert service["spec"].get("clusterIP") != "None", "clients reach the gateway on one VIP"
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == settings.grpc_port and ports["grpc"]["targetPort"] == "grpc"
    assert ports["grpc"].get("appProtocol") == "grpc"
    assert ports["metrics"]["targetPort"] == "metrics"
    exposed = {p["targetPort"] for s in overlay.of_kind("Service") for p in s["spec"]["ports"]}
    assert "health" not in exposed and settings.health_port not in exposed, "health port exposed"


def test_gateway_registers_probed_health_services(
    overlay: Rendered, settings_cls, monkeypatch
) -> None:
    """Every health service name a probe asks for is one the gateway sets.

    grpc.health.v1 answers NOT_FOUND for an unknown name, which fails the probe: a liveness
    name the gateway never registers would restart every pod in a loop.
    """
    sources = "\n".join(p.read_text() for p in (REPO_ROOT / "services" / "gateway").glob("*.py"))
    c = container(overlay, "gateway")
    settings_from_env(settings_cls, env_values(overlay, c), monkeypatch)
    for kind in PROBES:
        _, service = health_check(c, c[kind])
        if service:
            registered = f'"{service}"' in sources or f"'{service}'" in sources
            assert registered, (
                f"gateway {kind} asks grpc.health.v1 for {service!r}, which services/gateway "
                f"never sets: register it (SERVING while the server runs, independent of "
                f"Triton/Milvus) or change the probe"
            )


def test_gateway_files_come_from_secret_mounts(
    overlay: Rendered, settings_cls, monkeypatch
) -> None:
    """API keys and TLS material are read-only files of mounted Secrets, never inlined."""
    pod = overlay.workload("gateway")["spec"]["template"]
    c = pod["spec"]["containers"][0]
    settings = settings_from_env(settings_cls, env_values(overlay, c), monkeypatch)
    for field in ("api_keys_file", *TLS_KEYS):
        path = getattr(settings, field)
        if path is None:
            continue
        _, key, read_only = secret_file(pod, c, path)
        assert read_only, f"RECSYS_{field.upper()}: mount the Secret readOnly"
        if field in TLS_KEYS:
            assert key == TLS_KEYS[field], f"RECSYS_{field.upper()} must be key {TLS_KEYS[field]}"
    tls = [getattr(settings, f) is not None for f in TLS_KEYS]
    assert tls in ([False] * 3, [True] * 3, [True, True, False]), (
        "TLS needs both RECSYS_TLS_CERT_FILE and _KEY_FILE; a client CA needs them too"
    )
    if settings.tls_cert_file is not None:
        secrets = {
            secret_file(pod, c, getattr(settings, f))[0]
            for f in TLS_KEYS
            if getattr(settings, f) is not None
        }
        assert len(secrets) == 1, f"certificate, key and CA from one tls Secret: {secrets}"


def test_gateway_rules_file_is_a_configmap_updated_in_place(
    overlay: Rendered, settings_cls, monkeypatch, tmp_path: Path
) -> None:
    """RECSYS_RULES_FILE is a file of a ConfigMap volume mounted without subPath, from a
    ConfigMap without a name hash (so an edit reaches the running gateways, which re-read
    it), and its content is rules the gateway accepts at start."""
    from services.recommend.rules import RulesFile

    pod = overlay.workload("gateway")["spec"]["template"]
    c = pod["spec"]["containers"][0]
    settings = settings_from_env(settings_cls, env_values(overlay, c), monkeypatch)
    path = settings.rules_file
    assert path is not None, "RECSYS_RULES_FILE is not set for the gateway"
    mounts = [
        m for m in c.get("volumeMounts", []) if m["mountPath"].rstrip("/") == str(path.parent)
    ]
    assert len(mounts) == 1, f"{path.parent} is not a mounted volume"
    assert "subPath" not in mounts[0], "a subPath mount never sees the ConfigMap's updates"
    assert mounts[0].get("readOnly"), "mount the rules readOnly"
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mounts[0]["name"])
    name = volume["configMap"]["name"]
    config_map = overlay.get("ConfigMap", name)
    assert config_map["metadata"]["name"] == name, (
        f"{name}: a hashed ConfigMap is replaced on edit, never updated in place"
    )
    content = config_map["data"][path.name]
    local = tmp_path / path.name
    local.write_text(content)
    RulesFile(local).current()  # raises RulesConfigError for rules the gateway refuses


def test_prod_gateway_requires_api_keys_and_mutual_tls(
    rendered_all: dict[str, Rendered], settings_cls, monkeypatch
) -> None:
    prod = rendered_all["prod"]
    pod = prod.workload("gateway")["spec"]["template"]
    c = pod["spec"]["containers"][0]
    env = env_values(prod, c)
    settings = settings_from_env(settings_cls, env, monkeypatch)
    external = EXTERNAL_SECRETS["prod"]

    assert settings.auth_mode == "api_key"
    key_sources = []
    if settings.api_keys_file is not None:
        key_sources.append(secret_file(pod, c, settings.api_keys_file)[0])
    if isinstance(env.get(f"{ENV_PREFIX}API_KEYS"), dict):
        key_sources.append(env[f"{ENV_PREFIX}API_KEYS"]["secretKeyRef"]["name"])
    assert key_sources, "prod API keys must come from a Secret (file mount or secretKeyRef)"
    assert set(key_sources) <= external, f"{key_sources}: create them out of band (README)"

    for field in TLS_KEYS:
        assert getattr(settings, field) is not None, f"prod needs RECSYS_{field.upper()}"
        secret, _, _ = secret_file(pod, c, getattr(settings, field))
        assert secret in external, f"{secret}: the TLS Secret is created out of band (README)"
    pseudonym = env[f"{ENV_PREFIX}PSEUDONYM_KEY"]["secretKeyRef"]["name"]
    assert pseudonym in external


def test_no_exec_probes(variant: Rendered) -> None:
    """No probe of any workload runs a command in the container (a process start per probe
    per pod); gRPC, HTTP and TCP probes only."""
    for obj in variant.docs:
        if obj.get("kind") not in WORKLOAD_KINDS | {"RayJob"}:
            continue
        for label, template in pod_templates(obj):
            for c in containers(template):
                for kind in PROBES:
                    assert "exec" not in c.get(kind, {}), (
                        f"{variant.name} {obj['metadata']['name']}/{label}/{c['name']} {kind}"
                    )


@pytest.mark.parametrize("name", ["gateway", "triton"])
def test_selectors_match_pods(overlay: Rendered, name: str) -> None:
    workload = overlay.workload(name)
    labels = workload["spec"]["template"]["metadata"]["labels"]
    selectors = [workload["spec"]["selector"]["matchLabels"]]
    selectors.append(overlay.get("Service", name)["spec"]["selector"])
    selectors.append(overlay.get("PodDisruptionBudget", name)["spec"]["selector"]["matchLabels"])
    for selector in selectors:
        assert selector.items() <= labels.items(), f"{name}: {selector} does not select {labels}"


def test_gateway_reaches_triton(overlay: Rendered, settings_cls, monkeypatch) -> None:
    gateway = container(overlay, "gateway")
    settings = settings_from_env(settings_cls, env_values(overlay, gateway), monkeypatch)
    # gRPC through a ClusterIP sticks to one pod: a dns:/// target of a headless Service
    # (every ready pod, round_robin in the client) reaches them all.
    assert settings.triton_url.startswith("dns:///"), settings.triton_url
    host, _, port = settings.triton_url.removeprefix("dns:///").rpartition(":")
    service = overlay.get("Service", host)
    assert service["spec"].get("clusterIP") == "None", f"{host} must be headless"
    service_port = next(p for p in service["spec"]["ports"] if p["port"] == int(port))
    triton = container(overlay, "triton")
    selector = service["spec"]["selector"]
    labels = overlay.workload("triton")["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items(), f"{host} does not select the Triton pods"
    assert named_port(triton, service_port["targetPort"]) == int(port)
    assert service_port["targetPort"] == "grpc"
    assert flag(triton["args"], "grpc-port") == port


def test_gateway_reaches_milvus(overlay: Rendered, settings_cls, monkeypatch) -> None:
    gateway = container(overlay, "gateway")
    settings = settings_from_env(settings_cls, env_values(overlay, gateway), monkeypatch)
    assert not settings.milvus_is_lite, "Kubernetes must use the Milvus server, not Lite"
    uri = urlsplit(settings.milvus_uri)
    assert uri.scheme == "http" and uri.port == 19530
    (milvus,) = overlay.of_kind("Milvus")
    name = milvus["metadata"]["name"]
    if milvus["spec"].get("mode") != "cluster":
        # Standalone: one pod; the Milvus Operator's client Service is <name>-milvus.
        assert uri.hostname == f"{name}-milvus"
        return
    # Cluster: a headless Service over every proxy pod (operator labels), not the operator's
    # ClusterIP, which would keep each gateway's one gRPC connection on one proxy.
    service = overlay.get("Service", uri.hostname)
    assert service["spec"].get("clusterIP") == "None", f"{uri.hostname} must be headless"
    assert service["spec"]["selector"] == {
        "app.kubernetes.io/name": "milvus",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": "proxy",
    }
    (port,) = service["spec"]["ports"]
    assert port["port"] == port["targetPort"] == 19530


# --- Triton ------------------------------------------------------------------------------


def test_triton_server(overlay: Rendered) -> None:
    deployment = overlay.workload("triton")
    pod = deployment["spec"]["template"]
    c = pod["spec"]["containers"][0]
    assert c["image"].rsplit(":", 1)[1] == TRITON_IMAGE_TAG
    # tritonserver, started by the release launcher (test_triton_loads_the_pinned_release)
    assert c["command"] == ["bash", LAUNCHER]
    args = c["args"]
    ports = {"http": 8000, "grpc": 8001, "metrics": 8002}
    for name, number in ports.items():
        assert named_port(c, name) == number
        assert flag(args, f"{name}-port") == str(number)
    # explicit: only the release pointer's models load (test_triton_loads_the_pinned_release);
    # poll would serve whatever lands in the repository (a training run's export, lost+found).
    assert flag(args, "model-control-mode") is None, "the launcher sets it (explicit)"
    assert flag(args, "repository-poll-secs") is None
    assert flag(args, "strict-readiness") == "true"

    probes = {
        "livenessProbe": "/v2/health/live",
        "readinessProbe": "/v2/health/ready",
        "startupProbe": "/v2/health/ready",
    }
    for kind, path in probes.items():
        assert c[kind]["httpGet"]["path"] == path
        assert probe_port(c, c[kind]) == ports["http"]
    startup = c["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= 600, f"startup probe allows only {budget}s for model load"

    annotations = pod["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]

    # Model repository: a PVC mounted read-only where --model-repository points.
    repo = flag(args, "model-repository")
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == repo)
    assert mount.get("readOnly") is True
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert overlay.has("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])

    gpu = int(c["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
    assert (flag(args, "model-config-name") == "gpu") == (gpu > 0), (
        "GPU Triton must load configs/gpu.pbtxt and CPU Triton the default config.pbtxt"
    )


LAUNCHER = "/opt/recsys/load-release.sh"


def release_pointer(rendered: Rendered, c: dict[str, Any], variable: str) -> str:
    """The value of ``variable`` in container c, which must come from the release pointer."""
    source = env_values(rendered, c)[variable]
    assert isinstance(source, dict) and "configMapKeyRef" in source, (
        f"{variable} must come from the release pointer ConfigMap, not a literal"
    )
    ref = source["configMapKeyRef"]
    assert ref["name"].rsplit("-", 1)[0] == "model-release", ref
    return str(rendered.get("ConfigMap", ref["name"])["data"][ref["key"]])


def launcher(rendered: Rendered) -> str:
    """The script the Triton container runs, from the ConfigMap volume mounted at its path."""
    pod = rendered.workload("triton")["spec"]["template"]
    c = pod["spec"]["containers"][0]
    mount = next(m for m in c["volumeMounts"] if LAUNCHER.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    cm = rendered.get("ConfigMap", volume["configMap"]["name"])
    return cm["data"][LAUNCHER.rsplit("/", 1)[1]]


def run_launcher(
    rendered: Rendered, tmp_path: Path, release: str, previous: str, releases: dict[str, set[str]]
) -> tuple[int, list[str], str]:
    """Run Triton's launcher as the container would, with a stand-in tritonserver that
    records its arguments, over a repository holding ``releases``: release -> models with a
    version folder of it (ensembles as their pinned <name>_r<N>). (exit code, the model
    names it loads, the control mode)."""
    import os
    import subprocess

    c = container(rendered, "triton")
    repo = tmp_path / "models"
    (repo / "lost+found").mkdir(parents=True)
    for number, models in releases.items():
        for model in models:
            (repo / model / number).mkdir(parents=True, exist_ok=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "tritonserver"
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    stub.chmod(0o755)
    script = tmp_path / "load-release.sh"
    script.write_text(launcher(rendered))
    env = {k: v for k, v in env_values(rendered, c).items() if isinstance(v, str)}
    env |= {"RELEASE": release, "PREVIOUS_RELEASE": previous, "ARGS_OUT": str(tmp_path / "a")}
    env |= {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    args = [a.replace("=/models", f"={repo}") for a in c["args"]]
    proc = subprocess.run(
        ["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=30
    )
    if proc.returncode != 0:
        return proc.returncode, [], proc.stderr
    argv = (tmp_path / "a").read_text().splitlines()
    assert flag(argv, "model-repository") == str(repo)
    return 0, flags(argv, "load-model"), flag(argv, "model-control-mode") or ""


def flags(args: list[str], name: str) -> list[str]:
    """Every value of a repeatable flag (``--load-model``)."""
    prefix = f"--{name}="
    return [a[len(prefix) :] for a in args if a.startswith(prefix)]


def gateway_needs(rendered: Rendered, settings_cls, monkeypatch, release: str) -> set[str]:
    """The Triton models the gateway and the profile workers call when pinned to
    ``release`` (TritonClient.target of each model setting)."""
    from services.inference.triton_client import TritonClient

    needed: set[str] = set()
    for name in ("gateway", "profile-worker"):
        c = container(rendered, name)
        settings = settings_from_env(settings_cls, env_values(rendered, c), monkeypatch)
        settings = settings.model_copy(update={"triton_model_version": release})
        client = TritonClient(settings)
        try:
            models = (
                settings.triton_item_model,
                settings.triton_user_model,
                settings.triton_ranker_model,
                settings.triton_feature_ranker_model,
                settings.triton_sequence_model,
            )
            needed |= {client.target(m)[0] for m in models}
        finally:
            client.close()
    return needed


def test_triton_loads_the_pinned_release(
    overlay: Rendered, settings_cls, monkeypatch, tmp_path: Path
) -> None:
    """Triton (explicit model control) loads exactly the models the gateway calls for its
    pinned release, where the release has them (the rankers are optional), plus the previous
    release's; a release not on the volume fails the start; the gateway, the profile workers
    and Triton read one release pointer; nothing else on the volume is loaded."""
    triton = container(overlay, "triton")
    release = release_pointer(overlay, triton, "RELEASE")
    previous = release_pointer(overlay, triton, "PREVIOUS_RELEASE")
    assert release.isdigit() and previous.isdigit() and int(previous) <= int(release)
    for name in ("gateway", "profile-worker"):
        pinned = release_pointer(overlay, container(overlay, name), "RECSYS_TRITON_MODEL_VERSION")
        assert pinned == release, f"{name} pins {pinned}, Triton serves {release}"

    n, p = "7", "6"
    full = {
        v: gateway_needs(overlay, settings_cls, monkeypatch, v) | {"tokenizer", "item_encoder"}
        for v in (n, p)
    }
    towers_only = {m for m in full[n] if "embedder" in m}
    cases = [
        # (release, previous, what the volume holds, what must be loaded)
        (n, p, full, full[n] | full[p]),
        (n, n, full, full[n]),
        (n, p, {n: towers_only}, towers_only),  # no rankers in this release: towers only
        (n, p, {n: full[n], "8": {"item_embedder_r8"}}, full[n]),  # a newer export: not served
    ]
    for i, (rel, prev, volume, expected) in enumerate(cases):
        case = tmp_path / str(i)
        case.mkdir()
        code, loaded, mode = run_launcher(overlay, case, rel, prev, volume)
        assert code == 0, mode
        assert mode == "explicit"
        wanted = {m for m in expected if m not in {"tokenizer", "item_encoder"}}
        assert set(loaded) == wanted, f"case {i}: loads {sorted(loaded)}, wants {sorted(wanted)}"
        assert "lost+found" not in loaded
    missing = tmp_path / "missing"
    missing.mkdir()
    code, _, err = run_launcher(overlay, missing, "9", n, full)
    assert code != 0 and "release 9 is not in" in err, err


def test_release_rollout_applies_triton_first(overlay: Rendered) -> None:
    """The runbook's first step (k8s/README.md) applies `-l 'app.kubernetes.io/name in
    (model-release,triton)'`: that must take the new pointer ConfigMap and the Triton
    Deployment, and none of the gateway's or the workers' objects."""
    readme = (REPO_ROOT / "k8s" / "README.md").read_text()
    match = re.search(r"-l '(app\.kubernetes\.io/name) in \(([\w,-]+)\)'", readme)
    assert match, "the README's roll-out applies Triton first with a label selector"
    key, values = match.group(1), set(match.group(2).split(","))
    chosen = {
        (d["kind"], d["metadata"]["name"])
        for d in overlay.serving
        if d["metadata"].get("labels", {}).get(key) in values
    }
    kinds = {kind for kind, _ in chosen}
    assert ("Deployment", "triton") in chosen and "ConfigMap" in kinds, chosen
    pointer = {name for kind, name in chosen if kind == "ConfigMap"}
    # the pointer and Triton's launcher, both content-hashed: the new ones must go first
    assert {n.rsplit("-", 1)[0] for n in pointer} == {"model-release", "triton-launcher"}, pointer
    assert not {n for _, n in chosen} & {"gateway", "profile-worker"}, chosen


def test_no_poll_mode_anywhere(rendered_all: dict[str, Rendered]) -> None:
    """Neither a manifest nor the Triton image lets Triton pick up repository changes itself."""
    for rendered in rendered_all.values():
        for marker in ("model-control-mode=poll", "repository-poll-secs"):
            assert marker not in rendered.text, f"{rendered.name}: {marker}"
        script = launcher(rendered)
        assert "--model-control-mode=explicit" in script and "poll" not in script
    dockerfile = (REPO_ROOT / "docker" / "triton.Dockerfile").read_text()
    assert "model-control-mode=poll" not in dockerfile
    assert "model-control-mode=explicit" in dockerfile


def test_tensorrt_engine_cache_on_a_volume(overlay: Rendered) -> None:
    """Every TensorRT engine cache path of the configs GPU Triton loads is on a claim (sized,
    shared by the pods' nodes), not in /tmp's emptyDir: a restart must not rebuild engines."""
    pod = overlay.workload("triton")["spec"]["template"]
    c = pod["spec"]["containers"][0]
    name = flag(c["args"], "model-config-name")
    if name is None:
        return  # CPU configs (python backend): no TensorRT
    paths = set()
    for config in (REPO_ROOT / "model_repository").glob(f"*/configs/{name}.pbtxt"):
        found = re.findall(
            r'key:\s*"trt_engine_cache_path"\s*value:\s*"([^"]+)"', config.read_text()
        )
        paths |= set(found)
    assert paths, f"no trt_engine_cache_path in model_repository/*/configs/{name}.pbtxt"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    for path in paths:
        mounts = [
            m
            for m in c["volumeMounts"]
            if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
        ]
        mount = max(mounts, key=lambda m: len(m["mountPath"]))  # the innermost mount wins
        volume = volumes[mount["name"]]
        assert "persistentVolumeClaim" in volume, f"{path} is on {volume}, not a claim"
        assert not mount.get("readOnly"), f"{path}: Triton writes the engines"
        claim = overlay.get("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        assert claim["spec"]["resources"]["requests"]["storage"]
        # engines are per GPU: a folder per node, never one file for all nodes' pods
        assert mount.get("subPathExpr") == "$(NODE_NAME)", mount
        node = next(e for e in c["env"] if e["name"] == "NODE_NAME")
        assert node["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_gpu_model_configs_exist(rendered_all: dict[str, Rendered]) -> None:
    configs = sorted((REPO_ROOT / "model_repository").glob("*/config.pbtxt"))
    assert configs, "model_repository/ has no model configs"
    for overlay in rendered_all.values():
        args = container(overlay, "triton")["args"]
        name = flag(args, "model-config-name")
        if name:
            found = sorted((REPO_ROOT / "model_repository").glob(f"*/configs/{name}.pbtxt"))
            assert found, f"{overlay.name}: --model-config-name={name} but no configs/{name}.pbtxt"


# --- training ----------------------------------------------------------------------------


def entrypoint_commands(rayjob: dict[str, Any]) -> list[list[str]]:
    """The python -m commands of the RayJob entrypoint (a bash -c script)."""
    outer = shlex.split(rayjob["spec"]["entrypoint"])
    script = outer[-1] if outer[:2] == ["bash", "-c"] else rayjob["spec"]["entrypoint"]
    commands = [shlex.split(part) for part in re.split(r"[;\n]|&&", script) if part.strip()]
    return [c for c in commands if c[:2] == ["python", "-m"]]


def option(command: list[str], name: str) -> str:
    assert name in command, f"{' '.join(command)} lacks {name}"
    return command[command.index(name) + 1]


def mounts_by_claim(template: dict[str, Any]) -> dict[str, str]:
    """claimName -> mountPath for the (first) container of a pod template."""
    volumes = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in template["spec"].get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    c = template["spec"]["containers"][0]
    return {volumes[m["name"]]: m["mountPath"] for m in c["volumeMounts"] if m["name"] in volumes}


def test_model_repository_is_a_folder_of_its_volume(overlay: Rendered) -> None:
    """Triton serves a subPath of the model-repository claim, never the volume's root (where
    the file system's lost+found would be taken for a model), and every pod that writes
    releases mounts the same subPath."""
    sub_paths: dict[str, str | None] = {}
    for obj in overlay.docs:
        for label, template in pod_templates(obj) if "spec" in obj else []:
            claims = {
                v["name"]: v["persistentVolumeClaim"]["claimName"]
                for v in template["spec"].get("volumes", [])
                if "persistentVolumeClaim" in v
            }
            for c in containers(template):
                for m in c.get("volumeMounts", []):
                    if claims.get(m["name"]) == "model-repository":
                        sub_paths[f"{obj['kind']}/{label}/{c['name']}"] = m.get("subPath")
    assert "Deployment/triton/triton" in sub_paths, sorted(sub_paths)
    assert len(sub_paths) >= 2, f"no writer of the model repository: {sorted(sub_paths)}"
    values = set(sub_paths.values())
    assert len(values) == 1 and None not in values and "" not in values, sub_paths


def test_rayjob_trains_and_exports_into_the_served_repository(overlay: Rendered) -> None:
    rayjob = overlay.get("RayJob", "recsys-train")
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    commands = entrypoint_commands(rayjob)
    modules = [c[2] for c in commands]
    assert modules == ["training.train", "training.export"], modules
    train, export = commands
    assert re.fullmatch(r"training/configs/[\w-]+\.yaml", option(train, "--config"))

    cluster = spec["rayClusterSpec"]
    head_mounts = mounts_by_claim(cluster["headGroupSpec"]["template"])
    triton = overlay.workload("triton")["spec"]["template"]
    triton_repo = flag(triton["spec"]["containers"][0]["args"], "model-repository")
    triton_claim = next(k for k, v in mounts_by_claim(triton).items() if v == triton_repo)
    assert head_mounts.get(triton_claim) == option(export, "--repository"), (
        "export must write into the PVC Triton serves"
    )
    checkpoint = option(export, "--checkpoint")
    claims = [k for k, v in head_mounts.items() if checkpoint.startswith(v.rstrip("/") + "/")]
    assert claims, f"--checkpoint {checkpoint} is not on a shared volume of the head"
    for group in cluster["workerGroupSpecs"]:
        worker_mounts = mounts_by_claim(group["template"])
        assert worker_mounts.get(claims[0]) == head_mounts[claims[0]], (
            f"worker group {group['groupName']} must share the checkpoint volume"
        )


def test_rayjob_config_files_exist(overlay: Rendered) -> None:
    train = entrypoint_commands(overlay.get("RayJob", "recsys-train"))[0]
    assert (REPO_ROOT / option(train, "--config")).is_file()


def train_config(train: list[str]) -> Any:
    """The effective TrainConfig of a `python -m training.train` command line."""
    # A deleted entry point or config fails here: the manifests would run a missing file.
    assert (REPO_ROOT / "training" / "train.py").is_file(), "training/train.py is gone"
    config_path = REPO_ROOT / option(train, "--config")
    assert config_path.is_file(), f"{config_path.relative_to(REPO_ROOT)} is gone"
    from training.config import load_config

    overrides = [train[i + 1] for i, arg in enumerate(train) if arg == "--set"]
    return load_config(config_path, overrides)  # also rejects unknown keys


def test_training_runs_on_shared_storage(overlay: Rendered) -> None:
    """Ray Train storage and the final output live on the checkpoint volume the export reads."""
    rayjob = overlay.get("RayJob", "recsys-train")
    train, export = entrypoint_commands(rayjob)
    cfg = train_config(train)
    head = mounts_by_claim(rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"])
    root = head["training-checkpoints"].rstrip("/") + "/"
    assert f"{cfg.storage_path}/".startswith(root), f"storage_path {cfg.storage_path}"
    output = cfg.output_dir or f"{cfg.storage_path}/{cfg.name}/final"
    assert output == option(export, "--checkpoint"), "export must read the training output"


def test_worker_groups_fit_the_training_config(overlay: Rendered) -> None:
    """Ray Train asks for num_workers x (cpus_per_worker [+ 1 GPU]); the groups must fit."""
    rayjob = overlay.get("RayJob", "recsys-train")
    cfg = train_config(entrypoint_commands(rayjob)[0])
    capacity = 0
    for group in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        cpu = limits["cpu"]
        cpus = int(cpu[:-1]) // 1000 if str(cpu).endswith("m") else int(float(cpu))
        per_pod = cpus // cfg.cpus_per_worker
        if cfg.use_gpu:
            per_pod = min(per_pod, int(limits.get("nvidia.com/gpu", 0)))
        capacity += per_pod * group["replicas"]
    assert capacity >= cfg.num_workers, (
        f"{overlay.name}: worker groups host {capacity} Ray Train workers, config wants "
        f"{cfg.num_workers} (use_gpu={cfg.use_gpu}, cpus_per_worker={cfg.cpus_per_worker})"
    )


def _locked_ray_version() -> str | None:
    lock = REPO_ROOT / "requirements.lock"
    if lock.is_file():
        match = re.search(r"^ray(?:\[[^\]]*\])?==([^\s;#]+)", lock.read_text(), re.M)
        if match:
            return match.group(1)
    return None


def test_ray_version_matches_image(overlay: Rendered) -> None:
    expected = _locked_ray_version()
    assert expected is not None, "requirements.lock pins no ray"
    ray_version = overlay.get("RayJob", "recsys-train")["spec"]["rayClusterSpec"]["rayVersion"]
    assert ray_version == expected, f"rayVersion {ray_version} but the image has ray {expected}"


def test_training_env_paths_match_mounts(overlay: Rendered, settings_cls, monkeypatch) -> None:
    rayjob = overlay.get("RayJob", "recsys-train")
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    env = env_values(overlay, head["spec"]["containers"][0])
    settings = settings_from_env(settings_cls, env, monkeypatch)
    export = entrypoint_commands(rayjob)[1]
    assert Path(option(export, "--repository")) == settings.model_repository
