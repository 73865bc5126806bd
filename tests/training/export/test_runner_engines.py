"""The served runner's engines: bf16 towers on OpenVINO where the CPU has bf16 instructions,
ONNX Runtime's fp32 otherwise, and what it refuses."""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.training.export.served_runner import load_runner
from training.export.onnx_export import TowerExportReport, export_tower
from training.precision import cpu_has_bf16

BF16 = pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 instructions")
TOWER = {"input": [{"name": "input_ids"}, {"name": "attention_mask"}]}


@pytest.fixture(scope="module")
def tower(tmp_path_factory: pytest.TempPathFactory) -> TowerExportReport:
    from training.pretrained import make_tiny_bert

    bert = make_tiny_bert(tmp_path_factory.mktemp("bert"), hidden_size=64, intermediate_size=128)
    return export_tower(bert, tmp_path_factory.mktemp("onnx") / "model.onnx")


def _serve(
    runner: types.ModuleType, graph: Path, root: Path, engine: str | None, inputs: dict = TOWER
) -> object:
    (root / "1").mkdir(parents=True)
    shutil.copyfile(graph, root / "1" / "model.onnx")
    params = {"engine": {"string_value": engine}} if engine else {}
    config = {**inputs, "output": [{"name": "embedding"}], "parameters": params}
    model = runner.TritonPythonModel()
    model.initialize(
        {"model_config": json.dumps(config), "model_repository": str(root), "model_version": "1"}
    )
    return model


def _feeds(texts: int = 12, width: int = 30) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    mask = (np.arange(width)[None, :] < rng.integers(3, width + 1, texts)[:, None]).astype(np.int64)
    return {"input_ids": rng.integers(1000, 20000, (texts, width)) * mask, "attention_mask": mask}


def test_auto_serves_bf16_where_the_cpu_has_it_else_fp32(
    tower: TowerExportReport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    logs: list[str] = []
    runner = load_runner(monkeypatch, logs)
    model = _serve(runner, tower.onnx_path, tmp_path, "auto")
    feeds = _feeds()
    served = model.session.run(None, feeds)[0]  # type: ignore[attr-defined]
    expected = ort.InferenceSession(str(tower.onnx_path)).run(None, feeds)[0]
    if cpu_has_bf16():
        assert isinstance(model.session, runner.OpenVinoSession)  # type: ignore[attr-defined]
        assert "OpenVINO, bf16" in logs[-1]
        assert 1e-6 < np.abs(served - expected).max() < 0.05  # bf16, not fp32
        assert runner.min_row_cosine(served, expected) > runner.MIN_BF16_COSINE
    else:
        assert isinstance(model.session, ort.InferenceSession)  # type: ignore[attr-defined]
        assert "ONNX Runtime, fp32 (engine auto:" in logs[-1]
        assert np.abs(served - expected).max() < 1e-6


@BF16
def test_a_bf16_vector_barely_depends_on_its_batch(
    tower: TowerExportReport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alone, or in a batch padded to a longer neighbour: the same vector to within bf16's
    rounding (here exactly; on MovieLens texts, 4 of 2,000 moved by at most 8e-4 between
    file-order and length-bucketed batches of 64)."""
    model = _serve(load_runner(monkeypatch, []), tower.onnx_path, tmp_path, "openvino-bf16")
    session = model.session  # type: ignore[attr-defined]
    feeds = _feeds(width=80)
    batch = session.run(None, feeds)[0]
    for row in range(len(batch)):
        real = int(feeds["attention_mask"][row].sum())
        alone = {k: v[row : row + 1, :real] for k, v in feeds.items()}
        assert np.abs(session.run(None, alone)[0][0] - batch[row]).max() <= 2e-3


NO_BF16 = ("bf16_unavailable", lambda: "this CPU has no bf16 instructions")


@pytest.mark.parametrize(
    ("patch", "reason"),
    [
        pytest.param(("MIN_BF16_COSINE", 1.01), "min cosine to fp32", marks=BF16, id="too far"),
        pytest.param(NO_BF16, "no bf16 instructions", id="no bf16 instructions"),
    ],
)
def test_where_bf16_cannot_serve_auto_serves_fp32_and_openvino_bf16_refuses(
    tower: TowerExportReport,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    patch: tuple[str, object],
    reason: str,
) -> None:
    logs: list[str] = []
    runner = load_runner(monkeypatch, logs)
    monkeypatch.setattr(runner, *patch)
    model = _serve(runner, tower.onnx_path, tmp_path / "auto", "auto")
    assert isinstance(model.session, ort.InferenceSession)  # type: ignore[attr-defined]
    assert "ONNX Runtime, fp32 (engine auto:" in logs[-1] and reason in logs[-1]
    with pytest.raises(RuntimeError, match=f"openvino-bf16 cannot serve it: .*{reason}"):
        _serve(runner, tower.onnx_path, tmp_path / "fixed", "openvino-bf16")


def test_bf16_serves_only_the_towers_and_an_unknown_engine_is_refused(
    tower: TowerExportReport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    logs: list[str] = []
    runner = load_runner(monkeypatch, logs)
    features = {"input": [{"name": "features"}]}
    model = _serve(runner, tower.onnx_path, tmp_path / "ranker", "auto", features)
    assert isinstance(model.session, ort.InferenceSession)  # type: ignore[attr-defined]
    if cpu_has_bf16():
        assert "bf16 serves the BERT towers" in logs[-1]
    with pytest.raises(ValueError, match="engine 'tensorrt'"):
        _serve(runner, tower.onnx_path, tmp_path / "unknown", "tensorrt")
