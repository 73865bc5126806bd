"""ONNX export of a (tiny) tower and its fp16 variant, checked numerically (CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.export.gpu import FP16_TOLERANCE, fp16_parity, to_fp16
from training.export.onnx_export import ParityError, _check_parity, export_tower


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.pretrained import make_tiny_bert

    bert = make_tiny_bert(tmp_path_factory.mktemp("bert"))
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    report = export_tower(bert, out)
    assert report.max_abs_diff <= report.tolerance
    return out


def test_fp16_variant_is_close(tiny_onnx: Path, tmp_path: Path) -> None:
    fp16 = to_fp16(tiny_onnx, tmp_path / "model_fp16.onnx")
    assert 0 < fp16.stat().st_size < tiny_onnx.stat().st_size
    assert fp16_parity(tiny_onnx, fp16, ["CPUExecutionProvider"]) < FP16_TOLERANCE


def test_parity_check_fails_on_a_wrong_graph(tiny_onnx: Path) -> None:
    import torch

    class Wrong(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return torch.ones(input_ids.shape[0], 32)

    feeds = {
        "input_ids": torch.ones(2, 8, dtype=torch.long),
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
    }
    with pytest.raises(ParityError, match="max"):
        _check_parity(Wrong(), tiny_onnx, feeds, 1e-4)
