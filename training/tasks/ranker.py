"""The cross-encoder CTR ranker as a :class:`~training.tasks.base.Task`: binary
cross-entropy on labelled (user text, item text) pairs, AUC and log-loss on validation pairs.

Checkpoint format: ``ranker/`` (see :mod:`training.models.ranker`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from training.config import RankerConfig
from training.models.metrics import log_loss, roc_auc
from training.models.ranker import CrossEncoder, encode_pairs, load_ranker, save_ranker
from training.tasks.base import Batch, Row, Task

Pairs = Sequence[Row]


class PairCollator:
    """Tokenises (user, item) pairs exactly as the served ranker does, plus float labels."""

    def __init__(self, tokenizer: Any, max_seq_len: int) -> None:
        self.tok = tokenizer
        self.max_len = max_seq_len

    def __call__(self, rows: Sequence[Row]) -> Batch:
        enc = encode_pairs(
            self.tok, [r["user_text"] for r in rows], [r["item_text"] for r in rows], self.max_len
        )
        enc["labels"] = torch.tensor([float(r["label"]) for r in rows], dtype=torch.float32)
        return enc


@torch.no_grad()
def predict_pairs(
    model: CrossEncoder,
    tokenizer: Any,
    pairs: Pairs,
    *,
    max_seq_len: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Click probabilities for ``{"user_text", "item_text"}`` pairs."""
    model.eval()
    out = []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s : s + batch_size]
        enc = encode_pairs(
            tokenizer, [p["user_text"] for p in chunk], [p["item_text"] for p in chunk], max_seq_len
        )
        enc = {k: v.to(device) for k, v in enc.items()}
        out.append(torch.sigmoid(model(**enc)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def evaluate_ranker(
    model: CrossEncoder,
    tokenizer: Any,
    pairs: Pairs,
    *,
    max_seq_len: int,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """AUC and log-loss over all pairs, and AUC against the hard negatives alone (the ones
    retrieval ranks high, so the ones the ranker must tell apart in serving)."""
    if not pairs:
        return {}
    probs = predict_pairs(
        model, tokenizer, pairs, max_seq_len=max_seq_len, batch_size=batch_size, device=device
    )
    labels = np.array([float(p["label"]) for p in pairs])
    out = {
        "auc": roc_auc(labels, probs),
        "log_loss": log_loss(labels, probs),
        "eval_pairs": float(len(pairs)),
        "eval_positive_rate": float(labels.mean()),
    }
    hard = np.array([p.get("kind") != "random" for p in pairs])
    if hard.any() and (labels[hard] == 0).any():
        out["auc_vs_hard"] = roc_auc(labels[hard], probs[hard])
    return out


@dataclass
class RankerTask(Task[CrossEncoder, Pairs]):
    """Cross-encoder training with BCE, optionally class-balanced (``balance_classes``)."""

    cfg: RankerConfig
    name: ClassVar[str] = "ranker"
    #: BCE weight of the positive class; set per worker by :meth:`start`
    pos_weight: torch.Tensor | None = field(default=None, init=False)

    def build_model(self, pretrained: str) -> CrossEncoder:
        return CrossEncoder.from_pretrained(pretrained)

    def load_model(self, checkpoint: Path) -> CrossEncoder:
        return load_ranker(checkpoint / "ranker")[0]

    def save_model(self, model: CrossEncoder, tokenizer: Any, checkpoint: Path) -> None:
        save_ranker(model, tokenizer, checkpoint / "ranker", max_seq_len=self.cfg.max_seq_len)

    def collator(self, tokenizer: Any) -> PairCollator:
        return PairCollator(tokenizer, self.cfg.max_seq_len)

    def start(self, rows: Sequence[Row], device: torch.device) -> str:
        pos_rate = float(np.mean([e["label"] for e in rows])) if rows else 0.5
        if self.cfg.balance_classes and 0 < pos_rate < 1:
            self.pos_weight = torch.tensor([(1 - pos_rate) / pos_rate], device=device)
        return f"{len(rows)} pairs (positive rate {pos_rate:.3f})"

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        labels = batch.pop("labels")
        logits = model(**batch)
        return F.binary_cross_entropy_with_logits(logits, labels, pos_weight=self.pos_weight)

    def evaluate(
        self, model: CrossEncoder, tokenizer: Any, data: Pairs, device: torch.device
    ) -> dict[str, float]:
        return evaluate_ranker(
            model,
            tokenizer,
            data,
            max_seq_len=self.cfg.max_seq_len,
            batch_size=self.cfg.eval_batch_size,
            device=device,
        )
