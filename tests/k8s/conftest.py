"""Fixtures for the static Kubernetes checks (helpers live in k8s_helpers.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

# Make k8s_helpers importable whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from k8s_helpers import (
    CRD_FILES,
    OVERLAYS_DIR,
    REPO_ROOT,
    Rendered,
    crd_dir,
    overlay_names,
    render,
    render_variant,
    variant_names,
)


@pytest.fixture(scope="session")
def rendered_all(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Rendered]:
    tmp_root = tmp_path_factory.mktemp("kustomize")
    out = {}
    for name in variant_names():
        text = render_variant(name, tmp_root)
        serving = [d for d in yaml.safe_load_all(text) if d]
        parts = {}
        for part in ("training", "namespace"):
            directory = OVERLAYS_DIR / name / part
            parts[part] = render(directory) if directory.is_dir() else ""
        training = [d for d in yaml.safe_load_all(parts["training"]) if d]
        namespaces = [d for d in yaml.safe_load_all(parts["namespace"]) if d]
        out[name] = Rendered(
            name=name,
            text="---\n".join([parts["namespace"], text, parts["training"]]),
            docs=namespaces + serving + training,
            serving=serving,
            training=training,
            namespaces=namespaces,
        )
    return out


@pytest.fixture(params=overlay_names())
def overlay(request: pytest.FixtureRequest, rendered_all: dict[str, Rendered]) -> Rendered:
    """Each overlay under k8s/overlays, rendered."""
    return rendered_all[request.param]


@pytest.fixture(params=variant_names())
def variant(request: pytest.FixtureRequest, rendered_all: dict[str, Rendered]) -> Rendered:
    """Each overlay plus each documented overlay+component combination, rendered."""
    return rendered_all[request.param]


@pytest.fixture(scope="session")
def settings_cls() -> type:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from core.config import Settings

    return Settings


@pytest.fixture(scope="session")
def crds() -> dict[tuple[str, str], dict[str, Any]]:
    directory = crd_dir()
    if directory is None:
        pytest.skip(
            "UPSTREAM CRD CHECKS SKIPPED: no CRD directory (set RECSYS_CRD_DIR to a folder "
            "holding KubeRay v1.7.0 ray.io_rayjobs.yaml and Milvus Operator v1.3.8 "
            "milvus.io_milvuses.yaml; default ../shared/crds). RayJob and Milvus custom "
            "resources were NOT validated."
        )
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    out = {}
    for key, filename in CRD_FILES.items():
        path = directory / filename
        if not path.is_file():
            pytest.fail(f"{directory} has no {filename}", pytrace=False)
        with path.open() as fh:
            out[key] = yaml.load(fh, Loader=loader)
    return out
