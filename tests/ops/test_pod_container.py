"""The container smoke's ``docker run`` follows the rendered manifests (ops/pod_container.py):
whatever the gateway's pod declares (security context, environment, mounts) reaches the
container, so a manifest change the smoke does not follow fails here, not in a cluster."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from ops.container_smoke import render
from ops.pod_container import ManifestError, container_run, environment, find, prepare

WORKLOADS = ("Deployment", "StatefulSet")


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl is needed to render the overlays (make kubectl-installed)")
    return render("dev")


def gateway(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    workload = find(docs, WORKLOADS, "gateway")
    pod = workload["spec"]["template"]["spec"]
    return pod, next(c for c in pod["containers"] if c["name"] == "gateway")


def option_values(options: list[str], flag: str) -> list[str]:
    return [options[i + 1] for i, o in enumerate(options) if o == flag]


def test_security_context_reaches_docker_run(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    pod, c = gateway(docs)
    run = container_run(docs, "gateway", "gateway", tmp_path)
    psc, sc = pod.get("securityContext", {}), c.get("securityContext", {})
    uid = sc.get("runAsUser", psc.get("runAsUser"))
    gid = sc.get("runAsGroup", psc.get("runAsGroup"))
    assert uid not in (None, 0), "the gateway must declare a non-root runAsUser"
    assert option_values(run.options, "--user") == [f"{uid}:{gid}" if gid is not None else f"{uid}"]
    assert ("--read-only" in run.options) == bool(sc.get("readOnlyRootFilesystem"))
    assert sc.get("readOnlyRootFilesystem"), "the pod's root filesystem is read-only"
    if "fsGroup" in psc:
        assert str(psc["fsGroup"]) in option_values(run.options, "--group-add")
    assert set(option_values(run.options, "--cap-drop")) == set(
        sc.get("capabilities", {}).get("drop", [])
    )
    assert ("no-new-privileges" in option_values(run.options, "--security-opt")) == (
        sc.get("allowPrivilegeEscalation") is False
    )
    assert option_values(run.options, "--network") == ["host"]
    assert run.image == c["image"]
    assert run.command == [*c.get("command", []), *c.get("args", [])]


def test_every_mount_is_reproduced(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    pod, c = gateway(docs)
    run = container_run(docs, "gateway", "gateway", tmp_path)
    mounts = option_values(run.options, "--mount")
    targets = {dict(p.split("=", 1) for p in m.split(",") if "=" in p)["dst"]: m for m in mounts}
    assert set(targets) == {m["mountPath"] for m in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in c.get("volumeMounts", []):
        option = targets[mount["mountPath"]]
        volume = volumes.get(mount["name"], {})
        if "emptyDir" in volume:
            assert option.startswith("type=tmpfs")
        else:
            assert option.startswith("type=bind") and str(tmp_path) in option
        assert option.endswith(",readonly") == bool(
            mount.get("readOnly") or "secret" in volume or "configMap" in volume
        )


def test_environment_is_the_manifests_but_for_the_overrides(
    docs: list[dict[str, Any]], tmp_path: Path
) -> None:
    _, c = gateway(docs)
    overrides = {"RECSYS_TRITON_URL": "127.0.0.1:1", "RECSYS_GRPC_PORT": "2"}
    run = container_run(docs, "gateway", "gateway", tmp_path, overrides)
    expected = environment(docs, c)
    config_maps = [s["configMapRef"]["name"] for s in c.get("envFrom", []) if "configMapRef" in s]
    assert config_maps, "the gateway reads its settings from a ConfigMap"
    cm = find(docs, ["ConfigMap"], config_maps[0])
    assert set(cm["data"]) <= set(run.env)
    for key, value in run.env.items():
        assert value == overrides.get(key, expected[key]), key
    assert run.overridden == sorted(overrides)
    # Secrets rendered by the overlay are used as they are (dev: generated ones).
    for entry in c.get("env", []):
        assert entry["name"] in run.env


def test_a_manifest_change_changes_the_run(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    """Derived, not hard-coded: a new mount, setting and UID all show up."""
    changed = copy.deepcopy(docs)
    pod, c = gateway(changed)
    pod.setdefault("volumes", []).append({"name": "extra", "emptyDir": {"sizeLimit": "1Mi"}})
    c.setdefault("volumeMounts", []).append({"name": "extra", "mountPath": "/var/extra"})
    c["securityContext"]["runAsUser"] = 4242
    c.setdefault("env", []).append({"name": "RECSYS_SMOKE_PROBE", "value": "x"})
    c["securityContext"]["readOnlyRootFilesystem"] = False
    run = container_run(changed, "gateway", "gateway", tmp_path)
    assert any("dst=/var/extra" in m and "tmpfs-size=1048576" in m for m in run.options)
    assert option_values(run.options, "--user")[0].startswith("4242")
    assert run.env["RECSYS_SMOKE_PROBE"] == "x"
    assert "--read-only" not in run.options
    pod["volumes"].append({"name": "odd", "hostPath": {"path": "/"}})
    c["volumeMounts"].append({"name": "odd", "mountPath": "/odd"})
    with pytest.raises(ManifestError, match="odd"):
        container_run(changed, "gateway", "gateway", tmp_path)


def test_secret_volumes_become_read_only_files(tmp_path: Path) -> None:
    docs: list[dict[str, Any]] = [
        {"kind": "Secret", "metadata": {"name": "keys"}, "data": {"k": "dmFsdWU="}},
        {
            "kind": "Deployment",
            "metadata": {"name": "w"},
            "spec": {
                "template": {
                    "spec": {
                        "securityContext": {"runAsUser": 7, "fsGroup": 9},
                        "volumes": [
                            {"name": "s", "secret": {"secretName": "keys"}},
                            {"name": "data", "persistentVolumeClaim": {"claimName": "c"}},
                        ],
                        "containers": [
                            {
                                "name": "c",
                                "image": "i:1",
                                "volumeMounts": [
                                    {"name": "s", "mountPath": "/etc/keys"},
                                    {"name": "data", "mountPath": "/data"},
                                ],
                            }
                        ],
                    }
                }
            },
        },
    ]
    run = container_run(docs, "w", "c", tmp_path)
    mounts = option_values(run.options, "--mount")
    assert f"type=bind,src={tmp_path / 's'},dst=/etc/keys,readonly" in mounts
    assert f"type=bind,src={tmp_path / 'data'},dst=/data" in mounts
    secret, claim = run.host_dirs
    assert secret.files == {"k": b"value"}
    assert (claim.uid, claim.gid) == (7, 9)
    if os.geteuid() == 0:  # chown needs root
        prepare(run.host_dirs)
        assert (tmp_path / "s" / "k").read_bytes() == b"value"
        assert (tmp_path / "data").stat().st_gid == 9


def test_the_smoke_counts_the_gateway_processes_the_supervisor_started() -> None:
    from ops.container_smoke import started_processes

    line = "INFO services.gateway.processes 2 gateway processes on 0.0.0.0:50051 (pids 7, 8)"
    assert started_processes(f"starting\n{line}\nserving") == 2
    assert started_processes("a gateway serving in its main process") == 1
