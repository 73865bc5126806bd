"""checkov over every rendered overlay (one scan for the session), and skip hygiene.

Skips are allowed only with a justification: project-wide ones in k8s/.checkov.yaml, each
preceded by a comment; per-workload ones as ``checkov.io/skip<N>: <CHECK>=<reason>``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_helpers import K8S_DIR, REPO_ROOT, Rendered

CHECKOV_CONFIG = K8S_DIR / ".checkov.yaml"
SKIP_ANNOTATION = re.compile(r"^checkov\.io/skip\d+$")
MIN_REASON = 30  # characters: a justification, not a token


def checkov_executable() -> str:
    """$RECSYS_CHECKOV, else checkov beside this interpreter, on PATH, or in var/tools/checkov.

    checkov pins packaging<24 while ray needs packaging>=24.2, so it may live in its own
    virtualenv (k8s/README.md, "Validation").
    """
    candidates = [
        os.environ.get("RECSYS_CHECKOV"),
        str(Path(sys.executable).with_name("checkov")),
        shutil.which("checkov"),
        str(REPO_ROOT / "var" / "tools" / "checkov" / "bin" / "checkov"),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail(
        "checkov not found: set RECSYS_CHECKOV, or install it into its own virtualenv "
        "(python -m venv var/tools/checkov && var/tools/checkov/bin/pip install checkov)",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def checkov_report(
    rendered_all: dict[str, Rendered], tmp_path_factory: pytest.TempPathFactory
) -> list[dict[str, Any]]:
    scan_dir = tmp_path_factory.mktemp("checkov")
    for name, rendered in rendered_all.items():
        (scan_dir / f"{name.replace('+', '_')}.yaml").write_text(rendered.text)
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_NO_OUTPUT_COLOR": "1"}
    proc = subprocess.run(
        [
            checkov_executable(),
            "--config-file",
            str(CHECKOV_CONFIG),
            "--directory",
            str(scan_dir),
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=scan_dir,
        env=env,
    )
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(
            f"checkov produced no JSON (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n"
            f"{proc.stderr[-3000:]}",
            pytrace=False,
        )
    return report if isinstance(report, list) else [report]


def test_checkov_passes(checkov_report: list[dict[str, Any]]) -> None:
    kubernetes = [r for r in checkov_report if r.get("check_type") == "kubernetes"]
    assert kubernetes, f"checkov did not scan any Kubernetes manifest: {checkov_report}"
    summary = kubernetes[0]["summary"]
    assert summary["parsing_errors"] == 0, summary
    assert summary["resource_count"] > 0, summary
    failed = [
        f"{c['check_id']} {c['check_name']}: {c['resource']} ({c['file_path']})"
        for c in kubernetes[0]["results"]["failed_checks"]
    ]
    assert not failed, "checkov failures:\n" + "\n".join(failed)


def test_checkov_config_skips_are_justified() -> None:
    lines = CHECKOV_CONFIG.read_text().splitlines()
    config = yaml.safe_load("\n".join(lines))
    skips = config.get("skip-check", [])
    for check in skips:
        index = next(i for i, line in enumerate(lines) if line.strip() == f"- {check}")
        comment = []
        for line in reversed(lines[:index]):
            if not line.strip().startswith("#"):
                break
            comment.append(line.strip().lstrip("#").strip())
        reason = " ".join(reversed(comment))
        assert check in reason and len(reason) >= MIN_REASON, (
            f"k8s/.checkov.yaml skips {check} without a comment naming it and saying why"
        )


def test_skip_annotations_are_justified(variant: Rendered) -> None:
    for doc in variant.docs:
        annotations = doc["metadata"].get("annotations", {})
        for key, value in annotations.items():
            if not SKIP_ANNOTATION.match(key):
                continue
            check, _, reason = value.partition("=")
            assert re.fullmatch(r"CKV2?_K8S_\d+", check.strip()), f"{key}: {value!r}"
            assert len(reason.strip()) >= MIN_REASON, (
                f"{variant.name} {doc['kind']}/{doc['metadata']['name']}: {key} "
                "needs a justification after '='"
            )
