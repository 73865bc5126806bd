"""The item tower's int8 graph: close to PyTorch, and a text's vector independent of its batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.training.export.served_runner import load_runner
from training.export import onnx_export
from training.export.onnx_export import (
    ParityError,
    TowerExportReport,
    export_tower,
    quantize_tower,
)
from training.export.quantize import MS_DOMAIN, quantize_rowwise


@pytest.fixture(scope="module")
def tower(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, TowerExportReport]:
    from training.pretrained import make_tiny_bert

    bert = make_tiny_bert(tmp_path_factory.mktemp("bert"))
    return bert, export_tower(bert, tmp_path_factory.mktemp("onnx") / "model.onnx")


def _weight_matmuls(path: Path) -> int:
    model = onnx.load(str(path))
    weights = {t.name for t in model.graph.initializer}
    return sum(n.op_type == "MatMul" and n.input[1] in weights for n in model.graph.node)


def test_every_weight_matmul_becomes_int8_and_the_tower_stays_close(
    tower: tuple[str, TowerExportReport], tmp_path: Path
) -> None:
    _, export = tower
    fp32 = export.onnx_path
    before = _weight_matmuls(fp32)
    report = quantize_tower(export.reference, fp32, tmp_path / "model.int8.onnx")
    graph = onnx.load(str(report.onnx_path)).graph
    assert report.rewritten == before > 0 and _weight_matmuls(report.onnx_path) == 0
    assert sum(n.domain == MS_DOMAIN for n in graph.node) == before
    assert report.min_cosine >= report.min_allowed and report.batch_max_abs_diff <= 1e-4
    assert report.onnx_path.stat().st_size < fp32.stat().st_size


def test_a_vector_does_not_change_with_its_batch_companions(
    tower: tuple[str, TowerExportReport], tmp_path: Path
) -> None:
    """One text alone, beside a short text and beside a long, loud one: the same vector."""
    fp32 = tower[1].onnx_path
    int8 = tmp_path / "model.int8.onnx"
    quantize_rowwise(fp32, int8)
    session = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 2000, size=(3, 24))
    mask = np.ones_like(ids)
    mask[0, 10:] = 0  # the text under test: 10 tokens, padded
    ids[2] *= 0  # [PAD]-id tokens, unmasked: other activations than the random ones

    def run(rows: list[int]) -> np.ndarray:
        feeds = {"input_ids": ids[rows], "attention_mask": mask[rows]}
        return np.asarray(session.run(None, feeds)[0])

    alone = run([0])[0]
    for companions in ([0, 1], [0, 2], [0, 1, 2]):
        assert np.abs(run(companions)[0] - alone).max() < 1e-6


def test_per_batch_activation_scales_fail_the_export_check(
    tower: tuple[str, TowerExportReport], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ONNX Runtime's own dynamic quantisation (one scale per batch) makes a vector depend on
    its batch: the export refuses it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from training.export import quantize

    def per_batch(src: Path, out: Path) -> int:
        quantize_dynamic(src, out, weight_type=QuantType.QInt8, per_channel=True)
        return 1

    monkeypatch.setattr(quantize, "quantize_rowwise", per_batch)
    _, export = tower
    for bound in (0.0, 1.01):  # refused as wrong even where its cosine also falls short
        with pytest.raises(ParityError, match="alone"):
            onnx_export.quantize_tower(
                export.reference, export.onnx_path, tmp_path / "model.int8.onnx", bound
            )


def test_a_graph_without_weight_matmuls_is_refused(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    with pytest.raises(ValueError, match="no MatMul"):
        quantize_rowwise(tmp_path / "m.onnx", tmp_path / "q.onnx")


def test_the_runner_serves_the_named_graph_and_an_older_version_its_model_onnx(
    tower: tuple[str, TowerExportReport], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import shutil

    fp32 = tower[1].onnx_path
    logs: list[str] = []
    runner = load_runner(monkeypatch, logs).TritonPythonModel
    config = {
        "input": [{"name": "input_ids"}, {"name": "attention_mask"}],
        "output": [{"name": "embedding"}],
        "parameters": {"onnx_file": {"string_value": "model.int8.onnx"}},
    }
    for version in ("1", "2"):
        (tmp_path / version).mkdir()
        shutil.copyfile(fp32, tmp_path / version / "model.onnx")
    quantize_rowwise(fp32, tmp_path / "2" / "model.int8.onnx")
    feeds = {"input_ids": np.full((1, 6), 1500), "attention_mask": np.ones((1, 6), np.int64)}
    reference = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    expected = reference.run(None, feeds)[0]
    diffs = {}
    for version in ("1", "2"):
        model = runner()
        args = {"model_config": json.dumps(config), "model_repository": str(tmp_path)}
        model.initialize({**args, "model_version": version})
        diffs[version] = float(np.abs(model.session.run(None, feeds)[0] - expected).max())
    assert diffs["1"] < 1e-6 < diffs["2"]  # version 1 has no int8 graph: it serves fp32
    assert sum("1/model.int8.onnx missing" in line for line in logs) == 1


def test_a_release_whose_tower_quantises_poorly_ships_without_the_int8_graph(
    tower: tuple[str, TowerExportReport], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The int8 graph is optional: too far from PyTorch, it is left out, not the release."""
    from tests.stack_fixtures import repository_sources
    from training.export import __main__ as export

    def strict(
        reference: onnx_export.TowerReference, fp32_path: Path, int8_path: Path
    ) -> onnx_export.QuantizedReport:
        return onnx_export.quantize_tower(reference, fp32_path, int8_path, min_cosine=1.01)

    monkeypatch.setattr(export, "quantize_tower", strict)
    bert, _ = tower
    repo = repository_sources(tmp_path / "repo")
    report = export.export_release(repo, bert, bert)
    assert report["version"] == 1 and str(report["item_encoder_int8"]).startswith("not written")
    assert (repo / "item_encoder" / "1" / "model.onnx").is_file()
    assert not (repo / "item_encoder" / "1" / "model.int8.onnx").exists()
