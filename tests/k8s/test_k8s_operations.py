"""Operations manifests: Milvus in prod (proxies, resources, PDBs, spread, root password),
monitoring (ServiceMonitors, PrometheusRule) and secrets (Certificate, ExternalSecrets).

The operator resources of components/prod-operations have no CRD in RECSYS_CRD_DIR, so their
structure and every reference (Services, ports, Secrets and keys the workloads use, metric
names the code exports) are checked here.
"""

from __future__ import annotations

import re

import pytest
from k8s_helpers import (
    REPO_ROOT,
    WORKLOAD_KINDS,
    Rendered,
    containers,
    env_values,
    operator_secrets,
    pod_templates,
)

OPERATOR_GROUPS = ("monitoring.coreos.com/", "cert-manager.io/", "external-secrets.io/")
MILVUS_COMPONENTS = {
    "mixCoord": "mixcoord",
    "proxy": "proxy",
    "queryNode": "querynode",
    "dataNode": "datanode",
    "streamingNode": "streamingnode",
}
# Triton's own metrics (it exports them; nothing in this repository defines them).
TRITON_METRICS = {
    "nv_inference_queue_duration_us",
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_request_duration_us",
    "nv_inference_count",
    "nv_gpu_utilization",
}
REQUIRED_ALERTS = {
    "RecsysGatewayDegraded",
    "RecsysGatewayErrorRate",
    "RecsysDeadLetters",
    "RecsysProfileApplyLag",
    "RecsysTritonQueueTime",
}


def prod_like(rendered_all: dict[str, Rendered]) -> list[Rendered]:
    found = [r for name, r in rendered_all.items() if name.startswith("prod")]
    assert any(r.name == "prod" for r in found)
    return found


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


# --- Milvus ------------------------------------------------------------------------------


def milvus_labels(name: str, component: str) -> dict[str, str]:
    """The labels the Milvus Operator puts on a component's pods."""
    return {
        "app.kubernetes.io/name": "milvus",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
    }


def test_prod_milvus_components_sized_spread_and_budgeted(rendered_all) -> None:
    for prod in prod_like(rendered_all):
        milvus = prod.get("Milvus", "milvus")
        name, spec = milvus["metadata"]["name"], milvus["spec"]
        assert spec["mode"] == "cluster"
        pdbs = prod.of_kind("PodDisruptionBudget")
        for field, component in MILVUS_COMPONENTS.items():
            c = spec["components"][field]
            where = f"{prod.name} Milvus {field}"
            assert c["replicas"] >= 2, where
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], where
            labels = milvus_labels(name, component)
            (spread,) = c["topologySpreadConstraints"]
            assert spread["topologyKey"] == "kubernetes.io/hostname", where
            assert selects(spread["labelSelector"]["matchLabels"], labels), where
            budgets = [p for p in pdbs if selects(p["spec"]["selector"]["matchLabels"], labels)]
            assert len(budgets) == 1, f"{where}: {len(budgets)} PDBs (exactly one allowed)"
            assert budgets[0]["spec"].get("maxUnavailable") == 1, where
            # A budget must not also cover the other components.
            for other in set(MILVUS_COMPONENTS.values()) - {component}:
                assert not selects(
                    budgets[0]["spec"]["selector"]["matchLabels"], milvus_labels(name, other)
                ), f"{where}: its PDB also selects {other}"

        etcd = spec["dependencies"]["etcd"]["inCluster"]["values"]
        assert etcd["replicaCount"] == 3 and etcd["resources"]["limits"]["memory"]
        assert etcd.get("podAntiAffinityPreset") in {"soft", "hard"}
        assert etcd["pdb"]["create"] is False, "the chart's PDB would double ours"
        etcd_labels = {
            "app.kubernetes.io/name": "etcd",
            "app.kubernetes.io/instance": f"{name}-etcd",
        }
        budgets = [p for p in pdbs if selects(p["spec"]["selector"]["matchLabels"], etcd_labels)]
        assert len(budgets) == 1 and budgets[0]["spec"]["maxUnavailable"] == 1
        assert budgets[0]["spec"]["maxUnavailable"] < etcd["replicaCount"] // 2 + 1  # quorum
        minio = spec["dependencies"]["storage"]["inCluster"]["values"]
        assert minio["resources"]["limits"]["memory"]
        assert minio["podDisruptionBudget"]["enabled"] is False
        minio_labels = {"release": f"{name}-minio"}
        budgets = [p for p in pdbs if selects(p["spec"]["selector"]["matchLabels"], minio_labels)]
        assert len(budgets) == 1


def test_milvus_root_password_is_a_secret_and_matches_the_token(overlay: Rendered) -> None:
    """Authorization on; the root password Milvus sets at first start comes from a Secret (not
    the built-in "Milvus"), and the gateway's token is root:<that same password>."""
    milvus = overlay.get("Milvus", "milvus")["spec"]
    assert milvus["config"]["common"]["security"]["authorizationEnabled"] is True
    env = {e["name"]: e for e in milvus["components"].get("env", [])}
    ref = env["COMMON_SECURITY_DEFAULTROOTPASSWORD"]["valueFrom"]["secretKeyRef"]
    gateway = next(c for _, c in _gateway_containers(overlay))
    token_ref = env_values(overlay, gateway)["RECSYS_MILVUS_TOKEN"]["secretKeyRef"]
    rendered = {s["metadata"]["name"]: s for s in overlay.of_kind("Secret")}
    if ref["name"] in rendered:  # dev: generated, with a plain name the CR can use
        import base64

        def value(secret_ref: dict[str, str]) -> str:
            secret = overlay.get("Secret", secret_ref["name"])
            return base64.b64decode(secret["data"][secret_ref["key"]]).decode()

        password = value(ref)
        assert password and password != "Milvus", "the built-in default root password"
        assert value(token_ref) == f"root:{password}"
        return
    # prod: both Secrets made by External Secrets from one remote value.
    made = {es["spec"]["target"]["name"]: es for es in overlay.of_kind("ExternalSecret")}
    root, token = made[ref["name"]], made[token_ref["name"]]
    assert root["spec"]["data"][0]["secretKey"] == ref["key"]
    (source,) = {
        d["remoteRef"]["key"] + "#" + d["remoteRef"]["property"] for d in root["spec"]["data"]
    }
    token_sources = {
        d["remoteRef"]["key"] + "#" + d["remoteRef"]["property"] for d in token["spec"]["data"]
    }
    assert token_sources == {source}, "token and root password from different remote values"
    template = token["spec"]["target"]["template"]["data"][token_ref["key"]]
    variable = token["spec"]["data"][0]["secretKey"]
    assert re.fullmatch(r"root:\{\{\s*\." + re.escape(variable) + r"\s*\}\}", template), template


def _gateway_containers(overlay: Rendered):
    for obj in overlay.serving:
        if obj["kind"] == "Deployment" and obj["metadata"]["name"] == "gateway":
            for label, template in pod_templates(obj):
                for c in containers(template):
                    yield label, c


# --- monitoring --------------------------------------------------------------------------


def test_dev_needs_no_operator_crds(rendered_all: dict[str, Rendered]) -> None:
    dev = rendered_all["dev"]
    kinds = {f"{d['apiVersion']} {d['kind']}" for d in dev.docs}
    assert not [k for k in kinds if k.startswith(OPERATOR_GROUPS)], kinds


@pytest.mark.parametrize(
    ("workload", "setting"),
    [("gateway", "metrics_port"), ("profile-worker", "worker_metrics_port"), ("triton", None)],
)
def test_service_monitors_reach_the_metrics_ports(
    rendered_all: dict[str, Rendered], workload: str, setting: str | None, settings_cls
) -> None:
    for prod in prod_like(rendered_all):
        monitor = prod.get("ServiceMonitor", workload)
        pod = prod.workload(workload)["spec"]["template"]
        c = pod["spec"]["containers"][0]
        (endpoint,) = monitor["spec"]["endpoints"]
        services = [
            s
            for s in prod.of_kind("Service")
            if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
            and any(p.get("name") == endpoint["port"] for p in s["spec"]["ports"])
        ]
        assert len(services) == 1, f"{prod.name} {workload}: {len(services)} Services scraped"
        service = services[0]
        assert selects(service["spec"]["selector"], pod["metadata"]["labels"])
        port = next(p for p in service["spec"]["ports"] if p["name"] == endpoint["port"])
        container_ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        target = port["targetPort"]
        number = container_ports[target] if isinstance(target, str) else target
        assert number == int(pod["metadata"]["annotations"]["prometheus.io/port"])
        if setting:
            env = env_values(prod, c)
            expected = int(
                env.get(f"RECSYS_{setting.upper()}", settings_cls.model_fields[setting].default)
            )
            assert number == expected, f"{workload}: scrapes {number}, serves on {expected}"
        assert endpoint.get("path", "/metrics") == "/metrics"


def test_milvus_metrics_on(rendered_all: dict[str, Rendered]) -> None:
    for prod in prod_like(rendered_all):
        assert prod.get("Milvus", "milvus")["spec"]["components"].get("disableMetric") is False


def exported_metrics() -> dict[str, set[str]]:
    """Metric name -> label names, for every prometheus_client metric the services define."""
    out: dict[str, set[str]] = {}
    pattern = re.compile(
        r"(Counter|Gauge|Histogram|Summary)\(\s*\"(\w+)\"\s*,\s*\"[^\"]*\"\s*(?:,\s*\[([^\]]*)\])?",
        re.S,
    )
    for path in (REPO_ROOT / "services").rglob("*.py"):
        for kind, name, labels in pattern.findall(path.read_text()):
            base = name.removesuffix("_total")
            names = {name}
            if kind == "Counter":
                names = {f"{base}_total"}
            elif kind in {"Histogram", "Summary"}:
                names = {f"{name}_bucket", f"{name}_sum", f"{name}_count", name}
            label_names = set(re.findall(r"\"(\w+)\"", labels))
            for n in names:
                out[n] = label_names
    return out


def test_alerts_use_metrics_the_code_exports(rendered_all: dict[str, Rendered]) -> None:
    exported = exported_metrics()
    assert "recsys_requests_total" in exported and "recsys_dead_letters_total" in exported
    for prod in prod_like(rendered_all):
        (rule,) = prod.of_kind("PrometheusRule")
        alerts = [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
        assert {a["alert"] for a in alerts} >= REQUIRED_ALERTS
        for alert in alerts:
            where = f"{prod.name} {alert['alert']}"
            assert alert["labels"]["severity"] in {"warning", "critical"}, where
            assert alert["annotations"]["summary"], where
            expr = alert["expr"]
            assert expr.count("(") == expr.count(")"), where
            for name, selector in re.findall(r"\b((?:recsys|nv)_\w+)(\{[^}]*\})?", expr):
                if name.startswith("nv_"):
                    assert name in TRITON_METRICS, f"{where}: {name} is no Triton metric"
                    continue
                assert name in exported, f"{where}: no metric {name} in services/"
                for label in re.findall(r"(\w+)\s*[=!]~?", selector):
                    assert label in exported[name], f"{where}: {name} has no label {label}"


# --- secrets -----------------------------------------------------------------------------


def test_certificate_makes_the_gateway_tls_secret(rendered_all: dict[str, Rendered]) -> None:
    for prod in prod_like(rendered_all):
        (cert,) = prod.of_kind("Certificate")
        spec = cert["spec"]
        pod = prod.workload("gateway")["spec"]["template"]
        mounted = {
            v["secret"]["secretName"]: {i["key"] for i in v["secret"].get("items", [])}
            for v in pod["spec"]["volumes"]
            if "secret" in v
        }
        assert spec["secretName"] in mounted, f"the gateway does not mount {spec['secretName']}"
        assert mounted[spec["secretName"]] <= {"tls.crt", "tls.key", "ca.crt"}
        assert {"server auth", "client auth"} <= set(spec["usages"])
        assert spec["issuerRef"]["name"] and spec["issuerRef"]["kind"] in {
            "Issuer",
            "ClusterIssuer",
        }
        namespace = prod.namespace
        for host in (
            "gateway",
            f"gateway.{namespace}.svc",
            f"gateway.{namespace}.svc.cluster.local",
        ):
            assert host in spec["dnsNames"], host
        assert spec["renewBefore"] and spec["duration"]


def test_every_prod_secret_is_made_by_an_operator(rendered_all: dict[str, Rendered]) -> None:
    """Every Secret (and key) a prod workload or the Milvus CR uses is written by an
    ExternalSecret or the Certificate: none has to be created by hand."""
    for prod in prod_like(rendered_all):
        made = operator_secrets(prod)
        used: set[tuple[str, str | None]] = set()
        for obj in prod.docs:
            if obj["kind"] not in WORKLOAD_KINDS | {"RayJob"}:
                continue
            for _, template in pod_templates(obj):
                for volume in template["spec"].get("volumes", []):
                    if "secret" in volume:
                        items = volume["secret"].get("items") or [{"key": None}]
                        used |= {(volume["secret"]["secretName"], i["key"]) for i in items}
                for c in containers(template):
                    for entry in c.get("env", []):
                        ref = entry.get("valueFrom", {}).get("secretKeyRef")
                        if ref:
                            used.add((ref["name"], ref["key"]))
        for entry in prod.get("Milvus", "milvus")["spec"]["components"].get("env", []):
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                used.add((ref["name"], ref["key"]))
        assert {name for name, _ in used} >= {"gateway-tls", "milvus-root", "milvus-credentials"}
        for name, key in sorted(used, key=str):
            assert name in made, f"{prod.name}: nothing makes Secret {name}"
            assert key is None or key in made[name], f"{prod.name}: {name} lacks key {key}"
        for es in prod.of_kind("ExternalSecret"):
            store = es["spec"]["secretStoreRef"]
            assert store["name"] and store["kind"] in {"SecretStore", "ClusterSecretStore"}
            assert es["spec"]["target"].get("creationPolicy", "Owner") == "Owner"
            for item in es["spec"]["data"]:
                assert item["remoteRef"]["key"], es["metadata"]["name"]
