"""Two-tower retrieval model: a BERT user tower over behaviour text and a BERT item tower
over item text, each mean-pooled over the attention mask and L2-normalised, so the inner
product of a user and an item vector is their cosine similarity (Milvus metric ``IP``).

Weights are shared (one ``BertModel`` for both towers) or separate, by config.

Loss - in-batch sampled softmax: for a batch of ``B`` (user, positive item) pairs,
``logits = u @ v.T * scale`` and the loss is the cross-entropy of each user against the ``B``
items with its own item as the target. ``scale = 1 / temperature``; the temperature starts at
``temperature`` (default 0.05) and is *learnable* (stored as ``log_scale``, clamped so
``temperature >= 0.01``) unless ``learn_temperature`` is false. In-batch false negatives are
masked out (logit ``-inf``): another row with the same item id, or another row of the same
user (whose item is one of this user's positives too).

Saved format (what :mod:`training.export` reads)::

    <out>/user_tower/   config.json, model.safetensors, tokenizer files, tower_config.json
    <out>/item_tower/   same layout (identical weights when shared)

``tower_config.json``: ``{"pooling": "mean", "normalize": true, "max_seq_len": N,
"temperature": t, "shared_weights": bool}``. Each directory loads with
``AutoModel.from_pretrained``; the served vector is
``normalize(mean_pool(last_hidden_state, attention_mask))``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from training.pretrained import load_bert

TOWER_CONFIG = "tower_config.json"
MIN_TEMPERATURE = 0.01


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of token states where the mask is 1 (sentence-transformers mean pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def encode(bert: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    hidden = bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return F.normalize(mean_pool(hidden, attention_mask), p=2, dim=-1)


class PooledEncoder(nn.Module):
    """A BERT tower as served: mean pooling then L2 normalisation (as trained)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return encode(self.bert, input_ids, attention_mask)


class TwoTower(nn.Module):
    """User and item BERT towers with a (learnable) softmax temperature."""

    def __init__(
        self,
        user_bert: nn.Module,
        item_bert: nn.Module | None = None,
        *,
        temperature: float = 0.05,
        learn_temperature: bool = True,
    ) -> None:
        super().__init__()
        self.user_bert = user_bert
        self.shared = item_bert is None or item_bert is user_bert
        # register the item tower only when separate, so shared weights are one parameter set
        self.item_bert_separate = None if self.shared else item_bert
        log_scale = torch.tensor(math.log(1.0 / temperature), dtype=torch.float32)
        if learn_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    @property
    def item_bert(self) -> nn.Module:
        return self.user_bert if self.item_bert_separate is None else self.item_bert_separate

    @property
    def temperature(self) -> float:
        return float(1.0 / self.scale().detach())

    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=math.log(1.0 / MIN_TEMPERATURE)).exp()

    def encode_users(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return encode(self.user_bert, input_ids, attention_mask)

    def encode_items(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return encode(self.item_bert, input_ids, attention_mask)

    def forward(
        self,
        user_input_ids: torch.Tensor,
        user_attention_mask: torch.Tensor,
        item_input_ids: torch.Tensor,
        item_attention_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(user_vectors, item_vectors, scale)``."""
        u = self.encode_users(user_input_ids, user_attention_mask)
        v = self.encode_items(item_input_ids, item_attention_mask)
        return u, v, self.scale()

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        shared_weights: bool = True,
        item_path: str | None = None,
        temperature: float = 0.05,
        learn_temperature: bool = True,
    ) -> TwoTower:
        """Both towers from ``path`` (or the item tower from ``item_path``)."""
        user = load_bert(path)
        item = None if shared_weights else load_bert(item_path or path)
        return cls(user, item, temperature=temperature, learn_temperature=learn_temperature)


def in_batch_softmax_loss(
    user_vecs: torch.Tensor,
    item_vecs: torch.Tensor,
    scale: torch.Tensor | float,
    user_ids: torch.Tensor | None = None,
    item_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of each user over the batch's items, own item as target; other rows
    with the same item id or the same user id are masked (see module docstring)."""
    logits = user_vecs @ item_vecs.T * scale
    b = logits.shape[0]
    if user_ids is not None or item_ids is not None:
        eye = torch.eye(b, dtype=torch.bool, device=logits.device)
        mask = torch.zeros_like(eye)
        if item_ids is not None:
            mask |= item_ids.view(-1, 1) == item_ids.view(1, -1)
        if user_ids is not None:
            mask |= user_ids.view(-1, 1) == user_ids.view(1, -1)
        logits = logits.masked_fill(mask & ~eye, float("-inf"))
    target = torch.arange(b, device=logits.device)
    return F.cross_entropy(logits, target)


def save_towers(
    model: TwoTower, tokenizer: Any, out_dir: str | Path, *, max_seq_len: int
) -> dict[str, str]:
    """Save ``user_tower/`` and ``item_tower/`` as plain HF directories (see module doc)."""
    out = Path(out_dir)
    meta = {
        "pooling": "mean",
        "normalize": True,
        "max_seq_len": int(max_seq_len),
        "temperature": model.temperature,
        "shared_weights": model.shared,
    }
    paths = {}
    for name, bert in (("user_tower", model.user_bert), ("item_tower", model.item_bert)):
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        bert.save_pretrained(d)  # type: ignore[operator]
        tokenizer.save_pretrained(d)
        (d / TOWER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        paths[name] = str(d)
    return paths


def load_towers(
    model_dir: str | Path, *, learn_temperature: bool = True
) -> tuple[TwoTower, dict[str, Any]]:
    """Inverse of :func:`save_towers` (a checkpoint or final output directory)."""
    root = Path(model_dir)
    meta = json.loads((root / "user_tower" / TOWER_CONFIG).read_text())
    user = load_bert(root / "user_tower")
    item = None if meta.get("shared_weights", False) else load_bert(root / "item_tower")
    model = TwoTower(
        user,
        item,
        temperature=float(meta.get("temperature", 0.05)),
        learn_temperature=learn_temperature,
    )
    return model, meta
