"""Every overlay renders, and each overlay has the shape the issue asks for."""

from __future__ import annotations

from k8s_helpers import (
    OVERLAYS_DIR,
    REQUIRED_OVERLAYS,
    Rendered,
    containers,
    pod_templates,
)

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


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
        ("StatefulSet", "gateway"),
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
    ]:
        assert variant.has(kind, name), f"{variant.name}: missing {kind}/{name}"
    # The gateway was a Deployment: a leftover one would run pods without a WAL volume.
    assert not variant.has("Deployment", "gateway"), f"{variant.name}: gateway Deployment"


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


def test_queue_time_hpa_component(rendered_all: dict[str, Rendered]) -> None:
    hpa = rendered_all["prod+triton-queue-hpa"].get("HorizontalPodAutoscaler", "triton")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "triton"
    metrics = hpa["spec"]["metrics"]
    assert [m["pods"]["metric"]["name"] for m in metrics] == ["triton_queue_avg_us"]
