"""Export BERT towers and the ranker to ONNX and prove the graphs match PyTorch.

Each BERT graph takes ``input_ids`` and ``attention_mask`` (plus ``token_type_ids`` for the
cross-encoder) with dynamic batch and sequence axes; the feature ranker takes one
``features`` row per candidate. Towers end in mean pooling and L2
normalisation, so Milvus can search them by inner product; the ranker ends in a logit and its
sigmoid. Parity is checked on fresh texts the export never saw, and the export fails when the
largest absolute difference exceeds the stated tolerance.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.ranking_features import FEATURES
from core.sequence_inputs import GAP_BUCKETS, INPUTS, N_TOKENS, RANK_BUCKETS
from training.models.feature_ranker import FeatureScorer, load_feature_ranker
from training.models.ranker import load_scorer
from training.models.sequence import SASRec, load_sequence_model
from training.models.two_tower import PooledEncoder
from training.pretrained import load_bert

log = logging.getLogger(__name__)
__all__ = [
    "export_feature_ranker",
    "export_ranker",
    "export_sequence_model",
    "export_tower",
    "quantize_tower",
]

OPSET = 17
# fp32 ONNX Runtime vs PyTorch on normalised vectors / probabilities: differences are rounding
# noise of order 1e-6; anything above this means the graph is wrong, not imprecise.
PARITY_TOLERANCE = 1e-4
# The int8 tower (training.export.quantize) against PyTorch, by cosine: measured 0.9948 at
# worst over MovieLens' 9,742 item texts with MiniLM, 0.9964 with the fine-tuned tower.
INT8_MIN_COSINE = 0.99

PARITY_TEXTS = [
    "Heat (1995). Genres: Action, Crime, Thriller",
    "Recently liked: Toy Story (Adventure, Animation); Jumanji (Adventure, Children)",
    "a",
    "A much longer description of an item that goes on for a while so that the sequence "
    "axis is exercised at a length different from the other inputs in this batch.",
]


@dataclass(frozen=True)
class QuantizedReport:
    """The int8 tower: how close to PyTorch by cosine, and that batching changes no vector."""

    onnx_path: Path
    rewritten: int  # MatMuls now int8
    min_cosine: float
    min_allowed: float
    batch_max_abs_diff: float  # each text alone against the same text in the padded batch

    def as_dict(self) -> dict[str, object]:
        return {
            "onnx": str(self.onnx_path),
            "rewritten_matmuls": self.rewritten,
            "min_cosine": self.min_cosine,
            "min_allowed": self.min_allowed,
            "batch_max_abs_diff": self.batch_max_abs_diff,
        }


@dataclass(frozen=True)
class TowerReference:
    """A tower's parity inputs and PyTorch's vectors for them, kept by its export so that a
    graph derived from the exported one (the int8 graph) is checked against the same vectors
    without loading the tower again."""

    feeds: dict[str, np.ndarray]  # input_ids, attention_mask: the padded parity batch
    vectors: np.ndarray  # (texts, dim), unit norm


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


@dataclass(frozen=True)
class TowerExportReport(ExportReport):
    """A tower's export, with PyTorch's parity vectors for the graphs derived from it."""

    reference: TowerReference = field(repr=False, compare=False)


class ParityError(RuntimeError):
    """ONNX Runtime's output differs from PyTorch's beyond the tolerance."""


class QuantisationLoss(ParityError):
    """The int8 graph is correct but too far from PyTorch for this tower: an optional graph,
    so the release ships without it rather than failing."""


def _tokenize(tokenizer_path: str, texts: list[str], pairs: list[str] | None = None) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    args = (texts, pairs) if pairs is not None else (texts,)
    return dict(tok(*args, padding=True, truncation=True, max_length=128, return_tensors="pt"))


def _parity(
    module: nn.Module, onnx_path: Path, feeds: dict[str, torch.Tensor], tolerance: float
) -> tuple[float, list[np.ndarray]]:
    """ONNX Runtime against PyTorch on ``feeds``: the largest difference (refused beyond
    ``tolerance``) and PyTorch's outputs."""
    import onnxruntime as ort

    with torch.no_grad():
        expected = module(**feeds)
    expected_list = [e.numpy() for e in (expected if isinstance(expected, tuple) else [expected])]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in feeds.items()})
    diff = max(float(np.max(np.abs(e - g))) for e, g in zip(expected_list, got, strict=True))
    if not diff <= tolerance:
        raise ParityError(f"{onnx_path}: max |onnx - torch| = {diff:.3g} > {tolerance:.1g}")
    return diff, expected_list


def _check_parity(
    module: nn.Module, onnx_path: Path, feeds: dict[str, torch.Tensor], tolerance: float
) -> float:
    return _parity(module, onnx_path, feeds, tolerance)[0]


def export_tower(
    model_dir: str, onnx_path: Path, tolerance: float = PARITY_TOLERANCE
) -> TowerExportReport:
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
    diff, (vectors,) = _parity(module, onnx_path, feeds, tolerance)
    log.info("exported %s (max |onnx - torch| = %.2e)", onnx_path, diff)
    reference = TowerReference({k: v.numpy() for k, v in feeds.items()}, vectors)
    return TowerExportReport(onnx_path, diff, tolerance, len(PARITY_TEXTS), reference)


def quantize_tower(
    reference: TowerReference,
    fp32_path: Path,
    int8_path: Path,
    min_cosine: float = INT8_MIN_COSINE,
) -> QuantizedReport:
    """Write the int8 graph of an exported tower (``training.export.quantize``) and check it
    against the export's PyTorch vectors (``reference``): each parity text's vector within
    ``min_cosine`` of PyTorch's, and the same alone as in the padded batch (else the graph is
    wrong: rows must not depend on their neighbours)."""
    import onnxruntime as ort

    from training.export.quantize import quantize_rowwise

    rewritten = quantize_rowwise(fp32_path, int8_path)
    batch, expected = reference.feeds, reference.vectors
    session = ort.InferenceSession(str(int8_path), providers=["CPUExecutionProvider"])
    got = session.run(None, batch)[0]
    lengths = batch["attention_mask"].sum(axis=1)
    alone = np.concatenate(
        [
            session.run(None, {k: v[i : i + 1, :n] for k, v in batch.items()})[0]
            for i, n in enumerate(lengths)
        ]
    )
    cosine = float(np.min(np.sum(expected * got, axis=1)))  # both unit-norm
    batch_diff = float(np.max(np.abs(alone - got)))
    if not batch_diff <= PARITY_TOLERANCE:  # a wrong graph, whatever its cosine: first
        raise ParityError(
            f"{int8_path}: a text's vector alone differs from its vector in a batch by "
            f"{batch_diff:.3g} > {PARITY_TOLERANCE:.1g}"
        )
    if not cosine >= min_cosine:
        raise QuantisationLoss(f"{int8_path}: min cosine to torch {cosine:.4f} < {min_cosine}")
    log.info("quantised %s (%d MatMuls, min cosine %.4f)", int8_path, rewritten, cosine)
    return QuantizedReport(int8_path, rewritten, cosine, min_cosine, batch_diff)


def export_ranker(
    model_dir: str, onnx_path: Path, tolerance: float = PARITY_TOLERANCE
) -> ExportReport:
    """Export the cross-encoder ranker and check logits and probabilities on fresh pairs."""
    module = load_scorer(model_dir)
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


def export_feature_ranker(
    model_dir: str, onnx_path: Path, tolerance: float = PARITY_TOLERANCE
) -> ExportReport:
    """Export the DCN-v2 feature ranker and check it on feature rows it never saw: draws
    around the training distribution (its stored mean and spread), plus zeros and ones."""
    module = FeatureScorer(load_feature_ranker(Path(model_dir))).eval()
    mean, std = module.model.mean, module.model.std
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            module,
            (torch.zeros(2, len(FEATURES)),),
            str(onnx_path),
            dynamo=False,
            input_names=["features"],
            output_names=["logit", "probability"],
            dynamic_axes={
                "features": {0: "batch"},
                "logit": {0: "batch"},
                "probability": {0: "batch"},
            },
            opset_version=OPSET,
        )
    noise = torch.randn(254, len(FEATURES), generator=torch.Generator().manual_seed(0))
    rows = (mean + 2 * std * noise).clamp(min=0)
    edges = torch.stack([torch.zeros(len(FEATURES)), torch.ones(len(FEATURES))])
    feeds = {"features": torch.cat([rows, edges])}
    diff = _check_parity(module, onnx_path, feeds, tolerance)
    log.info("exported %s (max |onnx - torch| = %.2e)", onnx_path, diff)
    return ExportReport(onnx_path, diff, tolerance, len(feeds["features"]))


class SequenceRecommender(nn.Module):
    """The sequence model as served: the user vector after the latest event, its ``top_k``
    best items outside the inputs (score = dot product + request-time term, as
    :meth:`SASRec.score_users`), and the scores of given candidates. Index 0 (padding, and
    what the served model maps unknown candidates to) scores as a new item without content;
    it is never in the top list. Item table and request-time term are constants of the graph:
    they are what the model knew at the end of its training period."""

    table: torch.Tensor
    bias: torch.Tensor

    def __init__(self, model: SASRec, top_k: int) -> None:
        super().__init__()
        self.model = model.eval()
        table, bias = model.served_terms()
        self.register_buffer("table", table)
        self.register_buffer("bias", bias)
        self.top_k = min(top_k, model.space.n_items)

    def forward(
        self,
        items: torch.Tensor,
        tokens: torch.Tensor,
        gaps: torch.Tensor,
        ranks: torch.Tensor,
        candidates: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = {"items": items, "tokens": tokens, "gaps": gaps, "ranks": ranks}
        user = self.model.hidden(x, self.table)[:, -1]
        scores = user @ self.table.T + self.bias
        masked = scores.scatter(1, items, float("-inf"))  # the inputs and the padding column
        top_scores, top_items = masked.topk(self.top_k, dim=1)
        return user, top_items, top_scores, scores.gather(1, candidates)


def _sequence_parity(
    module: SequenceRecommender, onnx_path: Path, feeds: dict[str, torch.Tensor], tol: float
) -> float:
    """Like :func:`_check_parity`, but the top list is compared by the scores of the items
    each side chose (ties may pick different items; masked ``-inf`` scores are equal)."""
    import onnxruntime as ort

    with torch.no_grad():
        user, _, top_scores, cand = (t.numpy() for t in module(**feeds))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in feeds.items()})
    with torch.no_grad():
        full = (module.table @ torch.from_numpy(got[0]).T).T.numpy() + module.bias.numpy()
    chosen = np.take_along_axis(full, got[1], axis=1)  # torch-side scores of ONNX's picks
    finite = np.isfinite(top_scores)
    if not np.array_equal(finite, np.isfinite(got[2])):
        raise ParityError(f"{onnx_path}: the top lists differ in their masked entries")
    diff = max(
        float(np.max(np.abs(user - got[0]))),
        float(np.max(np.abs(cand - got[3]))),
        float(np.max(np.abs(top_scores[finite] - got[2][finite]), initial=0.0)),
        float(np.max(np.abs(chosen[finite] - top_scores[finite]), initial=0.0)),
    )
    if not diff <= tol:
        raise ParityError(f"{onnx_path}: max |onnx - torch| = {diff:.3g} > {tol:.1g}")
    return diff


def export_sequence_model(
    model_dir: str, version_dir: Path, top_k: int = 200, tolerance: float = PARITY_TOLERANCE
) -> ExportReport:
    """Export the sequence model (``model.onnx``, inputs of ``max_seq_len`` positions) with
    its id vocabulary (``items.json``: model index = position + 1) into ``version_dir``, and
    check it on real sequences of the catalogue and on the empty one."""
    model = load_sequence_model(Path(model_dir))
    module = SequenceRecommender(model, top_k).eval()
    n_len, n_items = model.cfg.max_seq_len, model.space.n_items
    version_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = version_dir / "model.onnx"
    rng = torch.Generator().manual_seed(0)
    b = 6

    def draw(high: int) -> torch.Tensor:
        return torch.randint(1, high, (b, n_len), generator=rng)

    feeds = {
        "items": draw(n_items + 1),
        "tokens": draw(N_TOKENS),
        "gaps": draw(GAP_BUCKETS),
        "ranks": draw(RANK_BUCKETS),
        "candidates": torch.randint(0, n_items + 1, (b, 100), generator=rng),
    }
    for name in INPUTS:  # left padding of different lengths, one empty history
        for row, pad in enumerate((0, 1, n_len // 2, n_len - 1, n_len, 3)):
            feeds[name][row, :pad] = 0
    with torch.no_grad():
        torch.onnx.export(
            module,
            tuple(feeds.values()),
            str(onnx_path),
            dynamo=False,
            input_names=list(feeds),
            output_names=["user_vector", "top_items", "top_scores", "candidate_scores"],
            dynamic_axes={
                **{n: {0: "batch"} for n in INPUTS},
                "candidates": {0: "batch", 1: "candidates"},
                "user_vector": {0: "batch"},
                "top_items": {0: "batch"},
                "top_scores": {0: "batch"},
                "candidate_scores": {0: "batch", 1: "candidates"},
            },
            opset_version=OPSET,
        )
    (version_dir / "items.json").write_text(json.dumps(model.space.item_ids) + "\n")
    diff = _sequence_parity(module, onnx_path, feeds, tolerance)
    log.info("exported %s (max |onnx - torch| = %.2e)", onnx_path, diff)
    return ExportReport(onnx_path, diff, tolerance, b)
