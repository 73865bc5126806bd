"""``bench.gpu_train``: the bundle and the CPU half of the run (the GPU half needs a GPU); the
sequence stage's modules import without Ray and the serving stack, as on the GPU machine."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench import gpu_train
from core.paths import REPO_ROOT

LOCAL_CONFIG = REPO_ROOT / "training" / "configs" / "local.yaml"


def test_rows_round_trip_with_their_lengths_and_one_value_keys(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = [
        {
            "items": rng.integers(1, 50, size=n),
            "seconds": rng.integers(0, 10**9, size=n).astype(np.int64),
            "user_positives": np.array(n // 2),
        }
        for n in (3, 7, 1, 5)
    ]
    gpu_train.save_rows(rows, tmp_path / "rows.npz")
    back = gpu_train.load_rows(tmp_path / "rows.npz")
    assert len(back) == len(rows)
    for a, b in zip(rows, back, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert np.array_equal(a[key], b[key]) and a[key].shape == b[key].shape, key
            assert a[key].dtype == b[key].dtype, key


def test_the_sequence_stage_imports_without_ray_or_the_serving_stack() -> None:
    """The GPU machine has PyTorch, pandas and transformers but neither Ray, pymilvus nor
    the others below: the bench's run must import there (pydantic travels as wheels)."""
    absent = ["ray", "pymilvus", "implicit", "mlflow", "tritonclient", "nats", "openvino"]
    code = (
        "import sys\n"
        f"for m in {absent!r}: sys.modules[m] = None\n"
        "import bench.gpu_train, training.steps, training.tasks.sequence\n"
        "import training.tasks.retrieval\n"
        "from training.tasks import SequenceTask\n"
        "print('imported')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "imported" in out.stdout, out.stderr[-2000:]


def test_pack_then_run_trains_the_same_stage_on_each_device(tmp_path: Path) -> None:
    """A small sequence stage on MovieLens with a tiny BERT's content vectors: the bundle,
    two epochs here and two in the run on the CPU; CUDA, absent here, is recorded as an
    error, not dropped."""
    from training.config import load_config
    from training.pretrained import make_tiny_bert

    bert = make_tiny_bert(tmp_path / "bert")
    cfg = load_config(
        LOCAL_CONFIG,
        [
            f"pretrained_model={bert}",
            "sequence.max_examples=96",
            "sequence.batch_size=16",
            "sequence.dim=16",
            "sequence.blocks=1",
            "sequence.max_seq_len=20",
            "sequence.time_periods=8",
            "sequence.content_max_seq_len=32",
            "sequence.content_cache=false",
        ],
    )
    bundle = tmp_path / "bundle"
    manifest = gpu_train.pack(cfg, bundle, epochs=2, wheels=False)
    assert manifest["stage"] == "sequence"
    assert manifest["sequences"] == 96 and manifest["content_dim"] == 32
    assert len(manifest["here"]["epochs"]) == 2 and "error" not in manifest["here"]
    assert json.loads((bundle / gpu_train.MANIFEST).read_text()) == manifest

    result = gpu_train.run(bundle, tmp_path / "out", ["cuda", "cpu"], epochs=None)
    cuda, cpu = result["runs"]
    if not cuda.get("epochs"):
        assert "error" in cuda and cuda["error"] in result["table"]
    assert [e["steps"] for e in cpu["epochs"]] == [6, 6]  # 96 sequences in batches of 16
    here = [e["loss"] for e in manifest["here"]["epochs"]]
    there = [e["loss"] for e in cpu["epochs"]]
    assert all(math.isfinite(x) for x in here + there)
    # the same stage from the same seed: the same losses up to the threads' summation order
    assert np.allclose(here, there, rtol=1e-3), (here, there)
    saved = json.loads((tmp_path / "out" / "bench_gpu_train.json").read_text())
    assert saved["table"] == result["table"] and "| cpu: " in result["table"]


def test_the_text_stage_travels_with_its_bert_in_half_the_bytes_and_trains_alike(
    tmp_path: Path,
) -> None:
    """The two-tower stage: its BERT packed with fp16 weights and widened back there, its
    examples and settings; the run on the CPU trains as the packing machine did."""
    from training.config import load_config
    from training.pretrained import make_tiny_bert

    bert = Path(make_tiny_bert(tmp_path / "bert"))
    cfg = load_config(
        LOCAL_CONFIG,
        [
            f"pretrained_model={bert}",
            "retrieval.max_examples=48",
            "retrieval.batch_size=8",
            "retrieval.max_seq_len=32",
        ],
    )
    bundle = tmp_path / "bundle"
    manifest = gpu_train.pack(cfg, bundle, epochs=2, wheels=False, stage="retrieval")
    assert manifest["stage"] == "retrieval" and manifest["examples"] == 48
    packed = bundle / gpu_train.BERT_DIR
    original = (bert / "model.safetensors").stat().st_size
    assert (packed / "model_fp16.safetensors").stat().st_size < 0.6 * original
    assert (packed / "tokenizer.json").is_file() and not (packed / "model.safetensors").exists()

    result = gpu_train.run(bundle, tmp_path / "out", ["cpu"], epochs=None)
    (cpu,) = result["runs"]
    assert [e["steps"] for e in cpu["epochs"]] == [6, 6]
    here = [e["loss"] for e in manifest["here"]["epochs"]]
    there = [e["loss"] for e in cpu["epochs"]]
    assert np.allclose(here, there, rtol=1e-3), (here, there)
    assert f"The two towers from {tmp_path.name}/bert, 48 examples" in result["table"]
