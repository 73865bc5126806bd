"""k8s/README.md pins the operator versions whose CRDs the tests validate against."""

from __future__ import annotations

import re

import pytest
from k8s_helpers import CRD_FILES, K8S_DIR, crd_dir

README = K8S_DIR / "README.md"
# The operator versions the manifests target (also the versions of the test CRDs).
OPERATORS = {"KubeRay": "v1.7.0", "Milvus Operator": "v1.3.8"}


def test_readme_pins_operator_versions() -> None:
    text = README.read_text()
    for operator, version in OPERATORS.items():
        assert re.search(rf"{operator}[^\n]*{re.escape(version)}", text), (
            f"k8s/README.md must pin {operator} {version}"
        )
        assert f"--version {version.lstrip('v')}" in text, f"install command for {operator}"


def test_crd_folder_matches_pinned_versions() -> None:
    directory = crd_dir()
    if directory is None or not (directory / "README.md").is_file():
        pytest.skip("UPSTREAM CRD CHECKS SKIPPED: no CRD folder README to compare versions with")
    table = (directory / "README.md").read_text()
    for filename in CRD_FILES.values():
        row = next((line for line in table.splitlines() if filename in line), None)
        assert row, f"{directory}/README.md does not list {filename}"
        assert any(v in row for v in OPERATORS.values()), f"{filename}: {row}"


def test_readme_sections() -> None:
    text = README.read_text()
    for needle in (
        "## Prerequisites",
        "## Deploy",
        "## Training, export, roll-out, roll-back",
        "## Scaling out",
        "Autoscaling Triton on queue time",
        "nvcr.io/nvidia/tritonserver:24.10-py3",
        "Not validated here",
        "### Event log: NATS JetStream",
        "persistentVolumeClaimRetentionPolicy",
        "### Gateway secrets",
        "rollout restart deployment/gateway",
    ):
        assert needle in text, f"k8s/README.md lacks {needle!r}"
