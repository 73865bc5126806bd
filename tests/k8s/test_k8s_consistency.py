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
    Rendered,
    containers,
    env_values,
    pod_templates,
)
from pydantic import SecretStr

ENV_PREFIX = "RECSYS_"
TRITON_IMAGE_TAG = "24.10-py3"


# --- helpers -----------------------------------------------------------------------------


def container(rendered: Rendered, kind: str, name: str, index: int = 0) -> dict[str, Any]:
    return rendered.get(kind, name)["spec"]["template"]["spec"]["containers"][index]


def named_port(c: dict[str, Any], name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    assert name in ports, f"container {c['name']} has no port named {name}"
    return ports[name]


def probe_port(c: dict[str, Any], probe: dict[str, Any]) -> int:
    port = next(iter(v for k, v in probe.items() if k in ("grpc", "httpGet", "tcpSocket")))
    value = port["port"]
    return named_port(c, value) if isinstance(value, str) else value


def flag(args: list[str], name: str) -> str | None:
    prefix = f"--{name}="
    values = [a[len(prefix) :] for a in args if a.startswith(prefix)]
    assert len(values) <= 1, f"--{name} given twice"
    return values[0] if values else None


def recsys_containers(rendered: Rendered):
    """(where, container) for every container that runs this project's Python code."""
    for obj in rendered.of_kind("Deployment") + rendered.of_kind("RayJob"):
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


def test_every_recsys_variable_is_a_setting(overlay: Rendered, settings_cls: type) -> None:
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in settings_cls.model_fields}
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
    assert not unknown, "not fields of services.config.Settings:\n" + "\n".join(sorted(unknown))


def test_settings_parse(overlay: Rendered, settings_cls: type, monkeypatch) -> None:
    """The values the manifests set are valid for the Settings types and validators."""
    for _, c in recsys_containers(overlay):
        settings_from_env(settings_cls, env_values(overlay, c), monkeypatch)


def test_secret_settings_come_from_secrets(overlay: Rendered, settings_cls: type) -> None:
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
    gateway_env = env_values(overlay, container(overlay, "Deployment", "gateway"))
    assert "secretKeyRef" in gateway_env[f"{ENV_PREFIX}MILVUS_TOKEN"]


def test_config_and_secret_references_resolve(overlay: Rendered) -> None:
    external = EXTERNAL_SECRETS.get(overlay.name, set())
    for obj in overlay.of_kind("Deployment") + overlay.of_kind("RayJob"):
        for _, template in pod_templates(obj):
            refs = []
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
                if kind == "Secret" and name in external:
                    continue
                matches = [d for d in overlay.of_kind(kind) if d["metadata"]["name"] == name]
                assert matches, (
                    f"{overlay.name}: {obj['metadata']['name']} uses missing {kind} {name}"
                )
                if key is not None:
                    assert key in matches[0].get("data", {}), f"{kind} {name} has no key {key}"


def test_external_secrets_are_documented() -> None:
    readme = (REPO_ROOT / "k8s" / "README.md").read_text()
    for names in EXTERNAL_SECRETS.values():
        for name in names:
            assert name in readme, f"k8s/README.md must say how to create Secret {name}"


# --- gateway -----------------------------------------------------------------------------


def test_gateway_ports_probes_and_shutdown(overlay: Rendered, settings_cls, monkeypatch) -> None:
    gateway = overlay.get("Deployment", "gateway")
    pod = gateway["spec"]["template"]
    c = pod["spec"]["containers"][0]
    settings = settings_from_env(settings_cls, env_values(overlay, c), monkeypatch)

    assert c["command"] == ["python", "-m", "services.gateway"]
    assert settings.grpc_host == "0.0.0.0", "RECSYS_GRPC_HOST must be 0.0.0.0 in a pod"
    assert named_port(c, "grpc") == settings.grpc_port
    assert named_port(c, "metrics") == settings.metrics_port != 0

    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = c[kind]
        assert "grpc" in probe, f"gateway {kind} must be a gRPC health probe"
        assert probe_port(c, probe) == settings.grpc_port
    readiness_service = c["readinessProbe"]["grpc"].get("service", "")
    assert readiness_service in proto_service_names(), readiness_service
    for kind in ("startupProbe", "livenessProbe"):
        service = c[kind]["grpc"].get("service", "")
        assert service != readiness_service, f"{kind} must not depend on Triton/Milvus health"

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
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == settings.grpc_port and ports["grpc"]["targetPort"] == "grpc"
    assert ports["grpc"].get("appProtocol") == "grpc"
    assert ports["metrics"]["targetPort"] == "metrics"


def test_gateway_registers_probed_health_services(overlay: Rendered) -> None:
    """Every health service name a probe asks for is one the gateway sets.

    grpc.health.v1 answers NOT_FOUND for an unknown name, which fails the probe: a liveness
    name the gateway never registers would restart every pod in a loop.
    """
    sources = "\n".join(p.read_text() for p in (REPO_ROOT / "services" / "gateway").glob("*.py"))
    c = container(overlay, "Deployment", "gateway")
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        service = c[kind]["grpc"].get("service", "")
        if service:
            registered = f'"{service}"' in sources or f"'{service}'" in sources
            assert registered, (
                f"gateway {kind} asks grpc.health.v1 for {service!r}, which services/gateway "
                f"never sets: register it (SERVING while the server runs, independent of "
                f"Triton/Milvus) or change the probe"
            )


@pytest.mark.parametrize("name", ["gateway", "triton"])
def test_selectors_match_pods(overlay: Rendered, name: str) -> None:
    labels = overlay.get("Deployment", name)["spec"]["template"]["metadata"]["labels"]
    selectors = [overlay.get("Deployment", name)["spec"]["selector"]["matchLabels"]]
    selectors.append(overlay.get("Service", name)["spec"]["selector"])
    selectors.append(overlay.get("PodDisruptionBudget", name)["spec"]["selector"]["matchLabels"])
    for selector in selectors:
        assert selector.items() <= labels.items(), f"{name}: {selector} does not select {labels}"


def test_gateway_reaches_triton(overlay: Rendered, settings_cls, monkeypatch) -> None:
    gateway = container(overlay, "Deployment", "gateway")
    settings = settings_from_env(settings_cls, env_values(overlay, gateway), monkeypatch)
    host, _, port = settings.triton_url.rpartition(":")
    service = overlay.get("Service", host)
    service_port = next(p for p in service["spec"]["ports"] if p["port"] == int(port))
    triton = container(overlay, "Deployment", "triton")
    assert named_port(triton, service_port["targetPort"]) == int(port)
    assert service_port["targetPort"] == "grpc"
    assert flag(triton["args"], "grpc-port") == port


def test_gateway_reaches_milvus(overlay: Rendered, settings_cls, monkeypatch) -> None:
    gateway = container(overlay, "Deployment", "gateway")
    settings = settings_from_env(settings_cls, env_values(overlay, gateway), monkeypatch)
    assert not settings.milvus_is_lite, "Kubernetes must use the Milvus server, not Lite"
    uri = urlsplit(settings.milvus_uri)
    assert uri.scheme == "http" and uri.port == 19530
    (milvus,) = overlay.of_kind("Milvus")
    # The Milvus Operator names the client Service <name>-milvus, in the CR's namespace.
    assert uri.hostname == f"{milvus['metadata']['name']}-milvus"


# --- Triton ------------------------------------------------------------------------------


def test_triton_server(overlay: Rendered) -> None:
    deployment = overlay.get("Deployment", "triton")
    pod = deployment["spec"]["template"]
    c = pod["spec"]["containers"][0]
    assert c["image"].rsplit(":", 1)[1] == TRITON_IMAGE_TAG
    assert c["command"] == ["tritonserver"]
    args = c["args"]
    ports = {"http": 8000, "grpc": 8001, "metrics": 8002}
    for name, number in ports.items():
        assert named_port(c, name) == number
        assert flag(args, f"{name}-port") == str(number)
    assert flag(args, "model-control-mode") == "poll", "new versions must load without restart"
    assert int(flag(args, "repository-poll-secs")) > 0

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


def test_gpu_model_configs_exist(rendered_all: dict[str, Rendered]) -> None:
    configs = sorted((REPO_ROOT / "model_repository").glob("*/config.pbtxt"))
    if not configs:
        pytest.skip("model_repository/ has no model configs yet (being written)")
    for overlay in rendered_all.values():
        args = container(overlay, "Deployment", "triton")["args"]
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
    triton = overlay.get("Deployment", "triton")["spec"]["template"]
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
    if not (REPO_ROOT / "training" / "configs").is_dir():
        pytest.skip("training/configs/ does not exist yet (training is being written)")
    train = entrypoint_commands(overlay.get("RayJob", "recsys-train"))[0]
    assert (REPO_ROOT / option(train, "--config")).is_file()


def train_config(train: list[str]) -> Any:
    """The effective TrainConfig of a `python -m training.train` command line."""
    if not (REPO_ROOT / "training" / "train.py").is_file():
        pytest.skip("training/train.py not written yet")
    config_path = REPO_ROOT / option(train, "--config")
    if not config_path.is_file():
        pytest.skip(f"{config_path.relative_to(REPO_ROOT)} not written yet")
    from training.train import load_config

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
    from importlib.metadata import PackageNotFoundError, version

    expected = _locked_ray_version()
    if expected is None:
        try:
            expected = version("ray")
        except PackageNotFoundError:
            pytest.skip("no requirements.lock pin and no ray installed to compare with")
    ray_version = overlay.get("RayJob", "recsys-train")["spec"]["rayClusterSpec"]["rayVersion"]
    assert ray_version == expected, f"rayVersion {ray_version} but the image has ray {expected}"


def test_training_env_paths_match_mounts(overlay: Rendered, settings_cls, monkeypatch) -> None:
    rayjob = overlay.get("RayJob", "recsys-train")
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    env = env_values(overlay, head["spec"]["containers"][0])
    settings = settings_from_env(settings_cls, env, monkeypatch)
    export = entrypoint_commands(rayjob)[1]
    assert Path(option(export, "--repository")) == settings.model_repository
