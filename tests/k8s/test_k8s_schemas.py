"""Schema validation, offline.

* Built-in objects: ``kubernetes-validate`` in strict mode (unknown fields are errors), against
  the oldest Kubernetes version the manifests support and the newest the package ships.
* Custom resources (RayJob, Milvus): the operators' own CRDs (``RECSYS_CRD_DIR``), their
  ``openAPIV3Schema`` turned into JSON Schema. Like ``kubectl apply`` (server-side strict
  field validation), unknown fields are errors unless the schema preserves them. CEL
  ``x-kubernetes-validations`` rules are not evaluated.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from k8s_helpers import CRD_FILES, Rendered
from kubernetes_validate import utils as kv_utils

# Native preStop `sleep` and PDB unhealthyPodEvictionPolicy need 1.30+ (see k8s/README.md).
MIN_KUBERNETES = "1.30.0"
KUBERNETES_VERSIONS = sorted({MIN_KUBERNETES, kv_utils.latest_version()})


def is_custom(doc: dict[str, Any]) -> bool:
    return (doc["apiVersion"].split("/")[0], doc["kind"]) in CRD_FILES


# Operator resources of components/prod-operations whose CRDs are not in RECSYS_CRD_DIR:
# tests/k8s/test_k8s_operations.py checks their structure and references instead.
OPERATOR_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("cert-manager.io/v1", "Certificate"),
    ("external-secrets.io/v1", "ExternalSecret"),
}


def is_operator_resource(doc: dict[str, Any]) -> bool:
    return (doc["apiVersion"], doc["kind"]) in OPERATOR_KINDS


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_builtin_objects_validate_strict(variant: Rendered, version: str) -> None:
    errors = []
    for doc in variant.docs:
        if is_custom(doc) or is_operator_resource(doc):
            continue
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"{where}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{where}: {doc['apiVersion']} is not a built-in API in {version}")
    assert not errors, f"{variant.name} vs Kubernetes {version}:\n" + "\n".join(errors)


def test_strict_validation_rejects_unknown_fields(rendered_all: dict[str, Rendered]) -> None:
    """Guard against a silently lenient validator."""
    for kind, name in (("Deployment", "gateway"), ("Deployment", "triton")):
        workload = copy.deepcopy(rendered_all["dev"].get(kind, name))
        workload["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(workload, MIN_KUBERNETES, strict=True)
    nats = copy.deepcopy(rendered_all["dev"].get("StatefulSet", "nats"))
    nats["spec"]["volumeClaimTemplates"][0]["spec"]["accessMode"] = ["ReadWriteOnce"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(nats, MIN_KUBERNETES, strict=True)


# --- custom resources against the operators' CRDs --------------------------------------


def openapi_to_jsonschema(node: Any, strict: bool = True) -> Any:
    """Kubernetes structural OpenAPI v3 schema -> JSON Schema (draft 7)."""
    if isinstance(node, list):
        return [openapi_to_jsonschema(n, strict) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key in ("properties", "patternProperties"):
            out[key] = {name: openapi_to_jsonschema(s, strict) for name, s in value.items()}
        else:
            out[key] = openapi_to_jsonschema(value, strict)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        for name, schema in (("apiVersion", "string"), ("kind", "string"), ("metadata", "object")):
            props.setdefault(name, {"type": schema})
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    preserves = node.get("x-kubernetes-preserve-unknown-fields") is True
    if (
        strict
        and "properties" in out
        and "additionalProperties" not in out
        and not preserves
        and out.get("type") in ("object", ["object", "null"])
    ):
        out["additionalProperties"] = False
    return out


_VALIDATORS: dict[tuple[str, str, str], jsonschema.Draft7Validator] = {}


def validator_for(crds: dict, doc: dict[str, Any]) -> jsonschema.Draft7Validator:
    group, version = doc["apiVersion"].split("/")
    key = (group, doc["kind"], version)
    if key not in _VALIDATORS:
        crd = crds[(group, doc["kind"])]
        versions = {v["name"]: v for v in crd["spec"]["versions"]}
        assert version in versions, f"CRD {crd['metadata']['name']} has no version {version}"
        assert versions[version].get("served"), f"{crd['metadata']['name']} {version} not served"
        schema = openapi_to_jsonschema(versions[version]["schema"]["openAPIV3Schema"])
        _VALIDATORS[key] = jsonschema.Draft7Validator(schema)
    return _VALIDATORS[key]


def test_custom_resources_validate_against_operator_crds(variant: Rendered, crds: dict) -> None:
    custom = [d for d in variant.docs if is_custom(d)]
    assert {d["kind"] for d in custom} == {kind for _, kind in CRD_FILES}
    errors = []
    for doc in custom:
        for err in validator_for(crds, doc).iter_errors(doc):
            path = ".".join(str(p) for p in err.absolute_path)
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {err.message}")
    assert not errors, f"{variant.name}:\n" + "\n".join(errors)


def test_crd_validation_rejects_unknown_fields(rendered_all: dict, crds: dict) -> None:
    """A misspelt field deep inside a RayJob pod template must fail, like the API would."""
    rayjob = copy.deepcopy(rendered_all["dev"].get("RayJob", "recsys-train"))
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    head["containers"][0]["imagePullPolicyy"] = "Always"
    assert list(validator_for(crds, rayjob).iter_errors(rayjob))
    milvus = copy.deepcopy(rendered_all["dev"].get("Milvus", "milvus"))
    milvus["spec"]["mode"] = "distributed"
    assert list(validator_for(crds, milvus).iter_errors(milvus))
