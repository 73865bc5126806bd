"""bf16 products for training's encoding passes: only on a CPU with bf16 instructions, and
close to fp32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.config import REPO_ROOT
from training import precision
from training.precision import cpu_has_bf16, use_bf16


def test_the_cpu_flags_decide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("flags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert not cpu_has_bf16(info)
    info.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert cpu_has_bf16(info)
    assert not cpu_has_bf16(tmp_path / "missing")
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert use_bf16(True, "cpu") and not use_bf16(False, "cpu")
    assert not use_bf16(True, torch.device("cuda"))  # a GPU pass stays as it is
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert not use_bf16(True, "cpu")


def test_the_setting_reads_as_a_yaml_boolean(tmp_path: Path) -> None:
    """``--set retrieval.bf16_encoding=off`` (YAML: false) turns it off; on by default."""
    from training.config import load_config

    config = REPO_ROOT / "training" / "configs" / "local.yaml"
    assert load_config(config, []).retrieval.bf16_encoding is True
    assert load_config(config, ["retrieval.bf16_encoding=off"]).retrieval.bf16_encoding is False


def test_bf16_encoding_stays_close_to_fp32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where bf16 is allowed (here on any CPU: PyTorch emulates it without the instructions)."""
    from training.models.two_tower import encode
    from training.pretrained import load_bert, load_tokenizer, make_tiny_bert
    from training.tasks.retrieval import encode_texts

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    path = make_tiny_bert(tmp_path / "bert", hidden_size=64, intermediate_size=128)
    bert, tok = load_bert(path).eval(), load_tokenizer(Path(path))
    texts = [f"Movie {i} (19{i:02d}). Genres: Drama, Comedy" * (1 + i % 3) for i in range(20)]

    def run(bf16: bool) -> torch.Tensor:
        return encode_texts(lambda i, m: encode(bert, i, m), tok, texts, max_seq_len=64, bf16=bf16)

    fp32, bf16 = run(False), run(True)
    assert fp32.dtype == bf16.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(fp32, bf16, dim=1)
    assert float(cosine.min()) > 0.999 and float((fp32 - bf16).abs().max()) > 1e-6
