"""NetworkPolicies, evaluated: who may open a connection to which pod and port.

A small evaluator of NetworkPolicy semantics (podSelector, namespaceSelector,
matchLabels/matchExpressions, ports; ingress at the target and egress at the source, both must
allow) runs over the pods each overlay creates, with the labels they will really carry
(operators add their own), plus outside clients, Prometheus, the operators and cluster DNS.
``test_exactly_the_needed_connections`` compares every (source, target, port) with the table
of connections the platform needs: each is open, nothing else is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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


def _own(rendered: Rendered) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": rendered.namespace}


def _rules_allow(rendered: Rendered, selected: Pod, peer: Pod, port: int, direction: str) -> bool:
    """Whether the policies of ``direction`` (Ingress/Egress) that select ``selected`` let it
    talk with ``peer`` on ``port``; no such policy = allowed (pods outside the namespace are
    never selected: these policies are namespaced)."""
    own = _own(rendered)
    if selected.namespace != own:
        return True
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    policies = [
        p
        for p in rendered.of_kind("NetworkPolicy")
        if direction in p["spec"].get("policyTypes", ["Ingress"])
        and matches(p["spec"]["podSelector"], selected.labels)
    ]
    if not policies:
        return True
    for policy in policies:
        for rule in policy["spec"].get(key, []):
            ports = rule.get("ports")
            if ports and not any(p.get("port") == port for p in ports):
                continue
            peers = rule.get(peers_key)
            if not peers or any(peer_allows(entry, peer, own) for entry in peers):
                return True
    return False


def allowed(rendered: Rendered, source: Pod, target: Pod, port: int) -> bool:
    """A connection opens when the source's egress and the target's ingress both allow it."""
    return _rules_allow(rendered, source, target, port, "Egress") and _rules_allow(
        rendered, target, source, port, "Ingress"
    )


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
    # Another Milvus component (cluster mode: query nodes, data nodes, mixCoord, ...).
    out["milvus-querynode"] = Pod(
        "milvus-querynode",
        {
            "app.kubernetes.io/name": "milvus",
            "app.kubernetes.io/instance": milvus,
            "app.kubernetes.io/component": "querynode",
        },
        own,
    )
    out["etcd"] = Pod(
        "etcd",
        {"app.kubernetes.io/name": "etcd", "app.kubernetes.io/instance": f"{milvus}-etcd"},
        own,
    )
    out["minio"] = Pod("minio", {"app": "minio", "release": f"{milvus}-minio"}, own)
    labels = rendered.workload("mlflow")["spec"]["template"]["metadata"]["labels"]
    out["mlflow"] = Pod("mlflow", labels, own)
    cron = rendered.get("CronJob", "recsys-segments")
    labels = cron["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    out["segments"] = Pod("segments", labels, own)
    out["kube-dns"] = Pod(
        "kube-dns", {"k8s-app": "kube-dns"}, {"kubernetes.io/metadata.name": "kube-system"}
    )
    out["kuberay-operator"] = Pod(
        "kuberay-operator",
        {"app.kubernetes.io/name": "kuberay-operator"},
        {"kubernetes.io/metadata.name": "kuberay-operator"},
    )
    out["stranger-same-ns"] = Pod("stranger-same-ns", {"app": "debug"}, own)
    out["stranger-other-ns"] = Pod("stranger-other-ns", {"app": "client"}, OTHER_NAMESPACE)
    out["prometheus"] = Pod("prometheus", {"app": "prometheus"}, MONITORING)
    out["milvus-operator"] = Pod(
        "milvus-operator",
        {"app": "milvus-operator"},
        {"kubernetes.io/metadata.name": "milvus-operator"},
    )
    return out


# Every port a connection could use: the platform's ports, DNS, the health-only port and an
# arbitrary dynamic one (Ray, Milvus internals).
PORTS = (
    53, 2379, 2380, 4222, 5000, 6222, 6379, 8000, 8001, 8002, 8080, 8086, 8222, 8265, 9000,
    9091, 9103, 9464, 10001, 12345, 19530, 50051,
)  # fmt: skip
ANY = PORTS


def needed_connections(p: dict[str, Pod], namespace: dict[str, str]) -> set[tuple[str, str, int]]:
    """(source, target, port) of every connection the platform makes, and nothing more."""
    own = {n for n, pod in p.items() if pod.namespace == namespace}
    outside = set(p) - own
    training = {n for n in p if n.startswith("ray-") and n != "ray-submitter"}
    milvus = {"milvus", "milvus-querynode"}
    rules: list[tuple[set[str], set[str], tuple[int, ...]]] = [
        (own, {"kube-dns"}, (53,)),  # every pod resolves names
        (outside, {"gateway"}, (50051,)),  # the public API (clients live elsewhere)
        ({"gateway", "profile-worker"}, {"triton"}, (8001,)),
        ({"gateway", "profile-worker"}, milvus, (19530,)),
        ({"gateway", "profile-worker", "segments"}, {"nats"}, (4222,)),
        ({"segments"}, milvus, (19530,)),
        (training, training, ANY),
        (training, {"mlflow"}, (5000,)),
        (training, milvus, (19530,)),
        (training, {"triton"}, (8000, 8001)),
        ({"ray-submitter", "kuberay-operator"}, training, (8265,)),
        (milvus, milvus, ANY),
        (milvus, {"etcd"}, (2379,)),
        (milvus, {"minio"}, (9000,)),
        ({"milvus-operator"}, milvus | {"etcd", "minio"}, ANY),
        ({"etcd"}, {"etcd"}, (2379, 2380)),
        ({"minio"}, {"minio"}, (9000,)),
        ({"nats"}, {"nats"}, (4222, 6222, 8222)),
        ({"prometheus"}, {"gateway"}, (9464,)),
        ({"prometheus"}, {"triton"}, (8002,)),
        ({"prometheus"}, milvus, (9091,)),
        ({"prometheus"}, training, (8080,)),
        ({"prometheus"}, {"profile-worker"}, (9103,)),
        ({"prometheus"}, {"nats"}, (8222,)),
    ]
    return {
        (source, target, port)
        for sources, targets, ports in rules
        for source in sources
        for target in targets
        for port in ports
    }


def test_default_deny_both_ways(overlay: Rendered) -> None:
    for name, kind in (("default-deny-ingress", "Ingress"), ("default-deny-egress", "Egress")):
        deny = overlay.get("NetworkPolicy", name)["spec"]
        assert deny["podSelector"] == {} and deny["policyTypes"] == [kind]
        assert not deny.get("ingress") and not deny.get("egress")


def test_exactly_the_needed_connections(overlay: Rendered) -> None:
    """Every connection the platform needs is open (egress at the source and ingress at the
    target), and no other (source, target, port) is, within the namespace or into it."""
    p = pods(overlay)
    namespace = {"kubernetes.io/metadata.name": overlay.namespace}
    needed = needed_connections(p, namespace)
    missing, extra = [], []
    for source, src in p.items():
        for target, dst in p.items():
            if src.namespace != namespace and dst.namespace != namespace:
                continue  # between two other namespaces: not these policies' business
            for port in PORTS:
                is_open = allowed(overlay, src, dst, port)
                if (source, target, port) in needed and not is_open:
                    missing.append(f"{source} -> {target}:{port}")
                elif is_open and (source, target, port) not in needed:
                    extra.append(f"{source} -> {target}:{port}")
    assert not missing, f"{overlay.name}: needed but blocked:\n" + "\n".join(missing)
    assert not extra, f"{overlay.name}: open but not needed:\n" + "\n".join(extra)


def test_evaluator_sees_egress(overlay: Rendered) -> None:
    """The evaluator applies both sides: Milvus' ingress does not name Triton, and a pod
    of the namespace that no egress rule names reaches nothing, not even the public port."""
    p = pods(overlay)
    assert not allowed(overlay, p["triton"], p["milvus"], 19530)
    assert allowed(overlay, p["gateway"], p["milvus"], 19530)
    assert not allowed(overlay, p["stranger-same-ns"], p["gateway"], 50051)  # egress denied
    assert allowed(overlay, p["stranger-other-ns"], p["gateway"], 50051)
    assert not allowed(overlay, p["stranger-other-ns"], p["gateway"], 8086)  # health port
