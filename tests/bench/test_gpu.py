"""``bench.gpu``: the bundle round trip and the CPU half of the run (the GPU half needs a GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import gpu
from bench.gpu_report import REFERENCE, render
from bench.tokens import TokenizerSpec

USERS = ["Recently liked: Heat (Action, Crime)", "Recently liked: Toy Story (Animation)"]
ITEMS = ["Jumanji (1995). Genres: Adventure", "Casino (1995). Genres: Crime, Drama"] * 20


@pytest.fixture(scope="module")
def tiny_ranker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.models.ranker import CrossEncoder, save_ranker
    from training.pretrained import load_bert, load_tokenizer, make_tiny_bert

    bert_dir = make_tiny_bert(tmp_path_factory.mktemp("bert"), seed=3)
    model = CrossEncoder(load_bert(bert_dir), hidden_size=32)
    out = tmp_path_factory.mktemp("ranker") / "ranker"
    return Path(save_ranker(model, load_tokenizer(bert_dir), out, max_seq_len=64))


def test_bundle_halves_the_weights_and_restores_them_within_fp16_rounding(
    tiny_ranker: Path, tmp_path: Path
) -> None:
    from safetensors.numpy import load_file

    spec = TokenizerSpec(tiny_ranker / "tokenizer.json", pair_max_length=64)
    bundle = gpu.pack_ranker(tiny_ranker, spec, {"users": USERS, "items": ITEMS}, tmp_path / "b")
    original = load_file(str(tiny_ranker / "model.safetensors"))
    packed = load_file(str(bundle / "ranker" / "model_fp16.safetensors"))
    restored = load_file(str(gpu.restore_ranker(bundle, tmp_path / "w") / "model.safetensors"))
    for name, value in original.items():
        if value.dtype == np.float32:
            assert packed[name].dtype == np.float16
            assert restored[name].dtype == np.float32
            np.testing.assert_allclose(restored[name], value, rtol=1e-3, atol=1e-4)
        else:
            np.testing.assert_array_equal(restored[name], value)


def test_run_times_every_available_backend_and_reports_quality(
    tiny_ranker: Path, tmp_path: Path
) -> None:
    spec = TokenizerSpec(tiny_ranker / "tokenizer.json", pair_max_length=64)
    bundle = gpu.pack_ranker(tiny_ranker, spec, {"users": USERS, "items": ITEMS}, tmp_path / "b")
    results = gpu.run(bundle, tmp_path / "out", seconds=0.05, batch_sizes=(1, 4), peak_seconds=0.2)
    assert results["errors"] == {}
    assert results["export"]["max_abs_diff"] <= results["export"]["tolerance"]
    backends = {r["backend"] for r in results["rows"]}
    assert {REFERENCE, "ort-cpu fp32 fused", "ort-cpu int8"} <= backends
    assert all(r["items_per_s"] > 0 and r["flops_per_s"] > 0 for r in results["rows"])
    fused = results["quality_vs_ort_cpu_fp32"]["ort-cpu fp32 fused"]
    assert fused["max_abs_diff_prob"] < 1e-4  # same fp32 arithmetic, fused kernels
    text = (tmp_path / "out" / "bench_gpu.md").read_text()
    assert "| ort-cpu int8 | 4 |" in text


def test_render_compares_the_fastest_backend_of_each_device() -> None:
    row = {"ms_per_batch": 1.0, "flops_per_s": 1e12, "share_of_peak": 0.5}
    rows = [
        {**row, "backend": REFERENCE, "device": "cpu", "batch": 16, "items_per_s": 100.0},
        {**row, "backend": "ort-cpu int8", "device": "cpu", "batch": 16, "items_per_s": 200.0},
        {**row, "backend": "pytorch-cuda fp16", "device": "gpu", "batch": 16, "items_per_s": 4e3},
        {**row, "backend": "ort-cpu int8", "device": "cpu", "batch": 1, "items_per_s": 50.0},
    ]
    text = render({"environment": {"gpu": "X", "tensorrt": "10.0"}, "rows": rows})
    assert "16: 20x (pytorch-cuda fp16 vs ort-cpu int8)" in text
    assert "1: " not in text.split("Best GPU")[1]  # batch 1 has no GPU row to compare
    assert "| pytorch-cuda fp16 | 16 | 4,000.0 | 1.00 | 40.00 |" in text
    assert "TensorRT was not importable" not in text


def test_report_adds_the_gpu_section_and_keeps_what_was_written_below(tmp_path: Path) -> None:
    """``python -m bench.gpu report`` re-renders BENCHMARKS.md's generated part only."""
    from bench.report import splice

    row: dict[str, object] = {"backend": REFERENCE, "device": "cpu", "batch": 16}
    row |= {"ms_per_batch": 1.0, "flops_per_s": 1e12, "share_of_peak": 0.5, "items_per_s": 100.0}
    results = {"environment": {"gpu": "X"}, "rows": [row]}
    lent = tmp_path / "out" / "bench_gpu.json"
    lent.parent.mkdir()
    lent.write_text(json.dumps(results))
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "bench.json").write_text(json.dumps({"machine": {"date": "then"}}))
    md = tmp_path / "BENCHMARKS.md"
    by_hand = "## Measured once (2026-12-05)\n\nkept\n"
    md.write_text(splice(None, "# Benchmarks\n\nno GPU yet\n") + "\n" + by_hand)
    assert gpu.report(lent, reports / "bench.json", md) == md
    text = md.read_text()
    assert "## GPU: the ranker on" in text and "no GPU yet" not in text
    assert text.endswith(by_hand)
    assert (reports / "bench_gpu.json").is_file()
