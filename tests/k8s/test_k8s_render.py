"""Every overlay renders, and each overlay has the shape the issue asks for."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from k8s_helpers import (
    COMPONENTS_DIR,
    K8S_DIR,
    OVERLAYS_DIR,
    REQUIRED_OVERLAYS,
    WORKLOAD_KINDS,
    Rendered,
    containers,
    overlay_names,
    pod_templates,
)

CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PriorityClass",
}


def gpu_limit(template: dict) -> int:
    return sum(
        int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        for c in containers(template)
    )


def tolerates_gpu(template: dict) -> bool:
    return any(t.get("key") == "nvidia.com/gpu" for t in template["spec"].get("tolerations", []))


def test_required_overlays_exist() -> None:
    for name in REQUIRED_OVERLAYS:
        assert (OVERLAYS_DIR / name / "kustomization.yaml").is_file(), f"missing overlay {name}"


def test_renders_namespaced_and_labelled(variant: Rendered) -> None:
    assert variant.docs, f"{variant.name} rendered nothing"
    namespace = variant.namespace
    for doc in variant.docs:
        meta = doc["metadata"]
        where = f"{variant.name}: {doc['kind']}/{meta['name']}"
        if doc["kind"] not in CLUSTER_SCOPED:
            assert meta.get("namespace") == namespace, f"{where} is not in {namespace}"
        labels = meta.get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "recsys", where
        if doc["kind"] not in {"Namespace", "NetworkPolicy", "ConfigMap", "Secret"}:
            assert "app.kubernetes.io/name" in labels, f"{where} lacks app.kubernetes.io/name"
            assert "app.kubernetes.io/component" in labels, where


def test_every_component_present(variant: Rendered) -> None:
    for kind, name in [
        ("Deployment", "gateway"),
        ("Service", "gateway"),
        ("Service", "gateway-headless"),
        ("HorizontalPodAutoscaler", "gateway"),
        ("PodDisruptionBudget", "gateway"),
        ("ConfigMap", "gateway-config"),
        ("Deployment", "triton"),
        ("Service", "triton"),
        ("PersistentVolumeClaim", "model-repository"),
        ("Milvus", "milvus"),
        ("RayJob", "recsys-train"),
        ("PersistentVolumeClaim", "training-checkpoints"),
        ("NetworkPolicy", "default-deny-ingress"),
        ("StatefulSet", "nats"),
        ("Service", "nats"),
        ("Service", "nats-headless"),
        ("PodDisruptionBudget", "nats"),
        ("NetworkPolicy", "nats-ingress"),
        ("Deployment", "profile-worker"),
    ]:
        assert variant.has(kind, name), f"{variant.name}: missing {kind}/{name}"
    # The gateway was a StatefulSet with a per-pod write-ahead log; it is stateless now.
    assert not variant.has("StatefulSet", "gateway"), f"{variant.name}: gateway StatefulSet"


def test_dev_is_cpu_single_replica_standalone(rendered_all: dict[str, Rendered]) -> None:
    dev = rendered_all["dev"]
    hpa = dev.get("HorizontalPodAutoscaler", "gateway")["spec"]
    assert hpa["minReplicas"] == hpa["maxReplicas"] == 1
    assert dev.get("Deployment", "triton")["spec"].get("replicas", 1) == 1
    assert dev.get("Milvus", "milvus")["spec"]["mode"] == "standalone"
    for obj in dev.of_kind("Deployment") + dev.of_kind("StatefulSet") + dev.of_kind("RayJob"):
        for label, template in pod_templates(obj):
            assert gpu_limit(template) == 0, f"dev {obj['kind']} {label} asks for a GPU"
            assert not tolerates_gpu(template), f"dev {obj['kind']} {label} tolerates GPU taint"
    for group in dev.get("RayJob", "recsys-train")["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        assert group["replicas"] == 1


def test_prod_is_gpu_replicated_cluster(rendered_all: dict[str, Rendered]) -> None:
    prod = rendered_all["prod"]
    hpa = prod.get("HorizontalPodAutoscaler", "gateway")["spec"]
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]
    triton = prod.get("Deployment", "triton")
    assert triton["spec"]["replicas"] >= 2
    template = triton["spec"]["template"]
    assert gpu_limit(template) >= 1, "prod Triton must request nvidia.com/gpu"
    assert tolerates_gpu(template), "prod Triton must tolerate the nvidia.com/gpu taint"
    assert "--model-config-name=gpu" in containers(template)[0]["args"]
    assert prod.get("Milvus", "milvus")["spec"]["mode"] == "cluster"
    rayjob = prod.get("RayJob", "recsys-train")
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert any(gpu_limit(g["template"]) >= 1 and tolerates_gpu(g["template"]) for g in groups)
    for pvc in prod.of_kind("PersistentVolumeClaim"):
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], pvc["metadata"]["name"]


def test_hpa_owns_replicas(variant: Rendered) -> None:
    """A workload scaled by an HPA must not pin spec.replicas (apply would reset it)."""
    for hpa in variant.of_kind("HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        assert target["apiVersion"] == "apps/v1", target
        workload = variant.get(target["kind"], target["name"])
        assert "replicas" not in workload["spec"], (
            f"{variant.name}: {target['name']} has spec.replicas and an HPA"
        )


def test_queue_time_hpa_overlay(rendered_all: dict[str, Rendered]) -> None:
    """The autoscaled variant is an overlay of its own, rendered as users apply it, and the
    HPA owns Triton's replica count there (test_hpa_owns_replicas runs on it too)."""
    autoscaled = rendered_all["prod-autoscaled"]
    hpa = autoscaled.get("HorizontalPodAutoscaler", "triton")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "triton"
    metrics = hpa["spec"]["metrics"]
    assert [m["pods"]["metric"]["name"] for m in metrics] == ["triton_queue_avg_us"]
    assert "replicas" not in autoscaled.get("Deployment", "triton")["spec"]
    assert not rendered_all["prod"].has("HorizontalPodAutoscaler", "triton")


def test_components_are_applied_by_overlays() -> None:
    """A component is only ever tested inside an overlay that applies it: the exact file a
    user applies. One that no overlay lists would be untested, or tested in a form (a
    wrapper) that differs from what a user writes."""
    used: set[Path] = set()
    for kustomization in OVERLAYS_DIR.glob("*/kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        used |= {(kustomization.parent / c).resolve() for c in spec.get("components", [])}
    for component in COMPONENTS_DIR.glob("*/kustomization.yaml"):
        assert component.parent.resolve() in used, f"no overlay applies {component.parent}"


def test_readme_applies_the_tested_overlays() -> None:
    """Every `kubectl apply -k` in the README names an overlay (or an overlay's training
    kustomization) that the tests render."""
    text = (K8S_DIR / "README.md").read_text()
    applied = set(
        re.findall(
            r"kubectl (?:apply|delete) -k k8s/overlays/([\w-]+(?:/training|/namespace)?)", text
        )
    )
    assert "prod-autoscaled" in applied, "the README must tell users to apply prod-autoscaled"
    assert "prod/training" in applied, "the runbook must start a run with its own kustomization"
    known = {
        f"{name}{part}" for name in overlay_names() for part in ("", "/training", "/namespace")
    }
    assert applied <= known, applied - known
    assert "delete rayjob" not in text, "a run is deleted with `kubectl delete -k .../training`"


def test_training_run_is_apart_from_serving(overlay: Rendered) -> None:
    """Applying the platform never starts a training run: the serving kustomization has no
    RayJob or Job, and each overlay's training kustomization holds only the run, so
    `kubectl delete -k` of it deletes the run and nothing long-lived."""
    assert (OVERLAYS_DIR / overlay.name / "training" / "kustomization.yaml").is_file()
    assert not [d["kind"] for d in overlay.serving if d["kind"] in {"RayJob", "Job"}]
    assert [d["kind"] for d in overlay.training] == ["RayJob"], overlay.name
    rayjob = overlay.training[0]
    assert rayjob["metadata"]["namespace"] == overlay.namespace
    serving_names = {(d["kind"], d["metadata"]["name"]) for d in overlay.serving}
    for label, template in pod_templates(rayjob):
        spec = template["spec"]
        account = spec.get("serviceAccountName")
        assert account is None or ("ServiceAccount", account) in serving_names, label
        for volume in spec.get("volumes", []):
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            assert claim is None or ("PersistentVolumeClaim", claim) in serving_names, label


def test_namespace_is_outside_the_overlay(overlay: Rendered) -> None:
    """`kubectl delete -k k8s/overlays/<name>` (or of its training run) must not delete the
    Namespace, and with it every claim the StatefulSets and operators made in it: the
    Namespace is its own kustomization, applied once."""
    for part, docs in (("serving", overlay.serving), ("training", overlay.training)):
        assert not [d for d in docs if d["kind"] == "Namespace"], f"{overlay.name} {part}"
    kinds = [d["kind"] for d in overlay.namespaces]
    assert kinds.count("Namespace") == 1, overlay.name
    # Cluster-wide prerequisites only: applied once with the namespace.
    assert set(kinds) <= {"Namespace", "PriorityClass"}, kinds
    (name,) = (d["metadata"]["name"] for d in overlay.namespaces if d["kind"] == "Namespace")
    for doc in overlay.serving + overlay.training:
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"].get("namespace") == name, doc["metadata"]["name"]
    readme = (K8S_DIR / "README.md").read_text()
    if overlay.name in REQUIRED_OVERLAYS:
        assert f"kubectl apply -k k8s/overlays/{overlay.name}/namespace" in readme


SERVING_CLASS, TRAINING_CLASS = "recsys-serving", "recsys-training"
# Workloads (and the Milvus CR's components) by the class they must run at.
SERVING_WORKLOADS = {"gateway", "profile-worker", "triton", "nats"}
TRAINING_WORKLOADS = {"mlflow", "recsys-segments", "recsys-train"}


def test_priority_classes(overlay: Rendered) -> None:
    """Serving preempts training, training never preempts, and every pod the overlay (or its
    training run) creates names one of the two classes, which the namespace kustomization
    (applied first, once) defines."""
    classes = {d["metadata"]["name"]: d for d in overlay.namespaces if d["kind"] == "PriorityClass"}
    assert set(classes) == {SERVING_CLASS, TRAINING_CLASS}, sorted(classes)
    serving, training = classes[SERVING_CLASS], classes[TRAINING_CLASS]
    assert serving["value"] > training["value"]
    assert serving.get("preemptionPolicy", "PreemptLowerPriority") == "PreemptLowerPriority"
    assert training.get("preemptionPolicy") == "Never"
    assert not serving.get("globalDefault") and not training.get("globalDefault")

    seen = set()
    for obj in overlay.serving + overlay.training:
        if obj["kind"] not in WORKLOAD_KINDS | {"RayJob"}:
            continue
        name = obj["metadata"]["name"]
        assert name in SERVING_WORKLOADS | TRAINING_WORKLOADS, f"{name}: which class?"
        expected = SERVING_CLASS if name in SERVING_WORKLOADS else TRAINING_CLASS
        for label, template in pod_templates(obj):
            got = template["spec"].get("priorityClassName")
            assert got == expected, f"{overlay.name} {name}/{label}: priorityClassName {got}"
        seen.add(name)
    assert seen == SERVING_WORKLOADS | TRAINING_WORKLOADS, sorted(seen)

    milvus = overlay.get("Milvus", "milvus")["spec"]
    assert milvus["components"].get("priorityClassName") == SERVING_CLASS
    for dependency in ("etcd", "storage"):
        values = milvus["dependencies"][dependency]["inCluster"]["values"]
        assert values.get("priorityClassName") == SERVING_CLASS, dependency
