"""NetworkPolicies, evaluated: who may open a connection to which pod and port.

A small evaluator of NetworkPolicy ingress semantics (podSelector, namespaceSelector,
matchLabels/matchExpressions, ports) runs over the pods each overlay creates, with the labels
they will really carry (operators add their own), plus outside clients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from k8s_helpers import Rendered, pod_templates

OTHER_NAMESPACE = {"kubernetes.io/metadata.name": "somewhere-else"}
MONITORING = {"kubernetes.io/metadata.name": "monitoring"}


@dataclass(frozen=True)
class Pod:
    name: str
    labels: dict[str, str]
    namespace: dict[str, str] = field(default_factory=dict)


def matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return False
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def peer_allows(peer: dict[str, Any], source: Pod, own_namespace: dict[str, str]) -> bool:
    if "ipBlock" in peer:
        return source.namespace != own_namespace  # treat as "outside the cluster"
    ns_ok = (
        matches(peer["namespaceSelector"], source.namespace)
        if "namespaceSelector" in peer
        else source.namespace == own_namespace
    )
    pod_ok = matches(peer["podSelector"], source.labels) if "podSelector" in peer else True
    return ns_ok and pod_ok


def allowed(rendered: Rendered, source: Pod, target: Pod, port: int) -> bool:
    own = {"kubernetes.io/metadata.name": rendered.namespace}
    policies = [
        p
        for p in rendered.of_kind("NetworkPolicy")
        if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and matches(p["spec"]["podSelector"], target.labels)
    ]
    if not policies:
        return True
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(p.get("port") == port for p in ports):
                continue
            peers = rule.get("from")
            if not peers or any(peer_allows(peer, source, own) for peer in peers):
                return True
    return False


def pods(rendered: Rendered) -> dict[str, Pod]:
    own = {"kubernetes.io/metadata.name": rendered.namespace}
    out = {}
    for name in ("gateway", "triton", "nats", "profile-worker"):
        labels = rendered.workload(name)["spec"]["template"]["metadata"]["labels"]
        out[name] = Pod(name, labels, own)
    rayjob = rendered.get("RayJob", "recsys-train")
    for label, template in pod_templates(rayjob):
        # KubeRay adds these; template labels win except ray.io/{node-type,group,cluster}.
        labels = {"app.kubernetes.io/name": "kuberay", "ray.io/is-ray-node": "yes"}
        labels |= template["metadata"].get("labels", {})
        out[f"ray-{label}"] = Pod(f"ray-{label}", labels, own)
    out["ray-submitter"] = Pod(
        "ray-submitter",
        {"batch.kubernetes.io/job-name": rayjob["metadata"]["name"]},
        own,
    )
    milvus = rendered.get("Milvus", "milvus")["metadata"]["name"]
    # Labels set by the Milvus Operator and by the etcd / MinIO charts it installs.
    out["milvus"] = Pod(
        "milvus",
        {
            "app.kubernetes.io/name": "milvus",
            "app.kubernetes.io/instance": milvus,
            "app.kubernetes.io/component": "proxy",
        },
        own,
    )
    out["etcd"] = Pod(
        "etcd",
        {"app.kubernetes.io/name": "etcd", "app.kubernetes.io/instance": f"{milvus}-etcd"},
        own,
    )
    out["minio"] = Pod("minio", {"app": "minio", "release": f"{milvus}-minio"}, own)
    out["stranger-same-ns"] = Pod("stranger-same-ns", {"app": "debug"}, own)
    out["stranger-other-ns"] = Pod("stranger-other-ns", {"app": "client"}, OTHER_NAMESPACE)
    out["prometheus"] = Pod("prometheus", {"app": "prometheus"}, MONITORING)
    out["milvus-operator"] = Pod(
        "milvus-operator",
        {"app": "milvus-operator"},
        {"kubernetes.io/metadata.name": "milvus-operator"},
    )
    return out


def test_default_deny(overlay: Rendered) -> None:
    deny = overlay.get("NetworkPolicy", "default-deny-ingress")["spec"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"]
    assert not deny.get("ingress")


def test_clients_reach_only_the_gateway(overlay: Rendered) -> None:
    p = pods(overlay)
    for client in ("stranger-other-ns", "stranger-same-ns"):
        assert allowed(overlay, p[client], p["gateway"], 50051)
        for target, ports in {
            "gateway": [9464],
            "triton": [8000, 8001, 8002],
            "milvus": [19530, 9091],
            "etcd": [2379],
            "minio": [9000],
            "ray-head": [8265, 6379, 10001],
            "nats": [4222, 6222, 8222],
            "profile-worker": [9103],
        }.items():
            for port in ports:
                assert not allowed(overlay, p[client], p[target], port), (
                    f"{client} can reach {target}:{port}"
                )


@pytest.mark.parametrize(
    ("target", "port"), [("triton", 8001), ("triton", 8000), ("milvus", 19530)]
)
def test_backends_accept_only_gateway_and_training(
    overlay: Rendered, target: str, port: int
) -> None:
    p = pods(overlay)
    allowed_sources = {
        name for name, pod in p.items() if name != target and allowed(overlay, pod, p[target], port)
    }
    expected = {"gateway", "profile-worker", "ray-head"} | {
        n for n in p if n.startswith("ray-") and n != "ray-submitter"
    }
    if target == "milvus":
        expected |= {"milvus-operator"}  # operator health checks; Milvus peers excluded above
    assert allowed_sources == expected, f"{target}:{port} open to {sorted(allowed_sources)}"


def test_operator_managed_traffic_still_flows(overlay: Rendered) -> None:
    """The policies must not break Milvus, its dependencies or the Ray cluster."""
    p = pods(overlay)
    assert allowed(overlay, p["milvus"], p["etcd"], 2379)
    assert allowed(overlay, p["milvus"], p["minio"], 9000)
    assert allowed(overlay, p["milvus"], p["milvus"], 19530)
    assert allowed(overlay, p["milvus-operator"], p["etcd"], 2379)
    workers = [n for n in p if n.startswith("ray-") and n not in {"ray-head", "ray-submitter"}]
    assert workers
    for worker in workers:
        assert allowed(overlay, p[worker], p["ray-head"], 6379)
        assert allowed(overlay, p["ray-head"], p[worker], 12345)
    assert allowed(overlay, p["ray-submitter"], p["ray-head"], 8265)
    assert not allowed(overlay, p["gateway"], p["etcd"], 2379)


def test_metrics_scrapable_from_monitoring(overlay: Rendered) -> None:
    p = pods(overlay)
    for target, port in [("gateway", 9464), ("triton", 8002), ("milvus", 9091)]:
        assert allowed(overlay, p["prometheus"], p[target], port), f"{target}:{port}"


def test_only_training_reaches_mlflow(overlay: Rendered) -> None:
    """The Ray driver (head) and workers log to the MLflow server; nobody else connects
    (people use `kubectl port-forward`, which NetworkPolicies do not filter)."""
    p = pods(overlay)
    labels = overlay.workload("mlflow")["spec"]["template"]["metadata"]["labels"]
    mlflow = Pod("mlflow", labels, {"kubernetes.io/metadata.name": overlay.namespace})
    sources = {name for name, pod in p.items() if allowed(overlay, pod, mlflow, 5000)}
    expected = {n for n in p if n.startswith("ray-") and n != "ray-submitter"}
    assert "ray-head" in expected and sources == expected, f"mlflow:5000 open to {sorted(sources)}"
