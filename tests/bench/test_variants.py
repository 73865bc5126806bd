"""The changed copy of a release: a twin item encoder that serves the tower otherwise."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench.util import config_parameters
from bench.variants import FP32, Variant, item_tower_served, served_label, variant_repository
from core.config import REPO_ROOT


def _release(root: Path) -> Path:
    for model in ("item_encoder", "item_embedder"):
        shutil.copytree(REPO_ROOT / "model_repository" / model, root / model, symlinks=True)
        (root / model / "1").mkdir()
    (root / "item_encoder" / "1" / "model.onnx").write_bytes(b"graph")
    return root


def test_the_twin_serves_the_named_graph_and_engine_and_the_release_is_unchanged(
    tmp_path: Path,
) -> None:
    release = _release(tmp_path / "release")
    before = (release / "item_encoder" / "config.pbtxt").read_text()
    out = variant_repository(release, Variant("t", item_twin=FP32), tmp_path / "copy")
    twin = config_parameters(out / "item_encoder_twin")
    assert (twin["onnx_file"], twin["engine"]) == FP32
    assert config_parameters(out / "item_encoder")["engine"] == "auto"
    assert (release / "item_encoder" / "config.pbtxt").read_text() == before
    ensemble = (out / "item_embedder_twin" / "config.pbtxt").read_text()
    assert (
        'name: "item_embedder_twin"' in ensemble and 'model_name: "item_encoder_twin"' in ensemble
    )
    assert (out / "item_encoder_twin" / "1" / "model.onnx").samefile(
        release / "item_encoder" / "1" / "model.onnx"
    )


def test_auto_is_resolved_as_the_runner_resolves_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bench.variants as variants

    release = _release(tmp_path)
    for bf16, engine in ((True, "OpenVINO bf16"), (False, "ONNX Runtime fp32")):
        monkeypatch.setattr(variants, "openvino_bf16", lambda bf16=bf16: bf16)
        assert served_label(item_tower_served(release / "item_encoder")) == f"model.onnx, {engine}"
