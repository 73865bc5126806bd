"""CTR ranker: a BERT cross-encoder over (user behaviour text, candidate item text).

Input encoding (training and serving must match)::

    tokenizer(user_text, item_text, truncation=True, max_length=max_seq_len)
    # -> [CLS] user tokens [SEP] item tokens [SEP], token_type_ids 0 / 1,
    #    "longest_first" truncation (the longer text is cut first)

Score: ``logit = head(last_hidden_state[:, 0])`` with ``head = nn.Linear(hidden_size, 1)`` on
the [CLS] state (no BERT pooler); click probability = ``sigmoid(logit)``. Trained with
``BCEWithLogitsLoss`` on positives and sampled negatives (random + hard negatives mined with
the retrieval towers) and AdamW (decoupled weight decay; biases and LayerNorm excluded).

Saved format (what :func:`load_ranker` and :func:`load_scorer` read)::

    <out>/ranker/
        config.json, model.safetensors      BertModel.save_pretrained
        tokenizer files                     tokenizer.save_pretrained
        head.pt                             state dict of nn.Linear(hidden_size, 1)
                                            (keys "weight" [1, hidden], "bias" [1])
        ranker_config.json                  {"pooling": "cls", "hidden_size": H,
                                             "max_seq_len": N, "input": "pair"}
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.pretrained import load_bert

RANKER_CONFIG = "ranker_config.json"
HEAD_FILE = "head.pt"


class CrossEncoder(nn.Module):
    """BertModel + linear head on [CLS] -> one logit per (user, item) pair."""

    def __init__(self, bert: nn.Module, hidden_size: int | None = None) -> None:
        super().__init__()
        self.bert = bert
        config: Any = getattr(bert, "config", None)
        hidden = hidden_size or int(config.hidden_size)
        self.head = nn.Linear(hidden, 1)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of shape ``(batch,)``."""
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        return self.head(hidden[:, 0]).squeeze(-1)

    @classmethod
    def from_pretrained(cls, path: str) -> CrossEncoder:
        return cls(load_bert(path))


def encode_pairs(
    tokenizer: Any, users: Sequence[str], items: Sequence[str], max_seq_len: int
) -> dict[str, torch.Tensor]:
    """Tokenise (user, item) pairs exactly as the served ranker expects."""
    return dict(
        tokenizer(
            list(users),
            list(items),
            truncation=True,
            max_length=max_seq_len,
            padding=True,
            return_tensors="pt",
        )
    )


def save_ranker(
    model: CrossEncoder, tokenizer: Any, out_dir: str | Path, *, max_seq_len: int
) -> str:
    """Write ``<out_dir>`` in the format of the module docstring; returns the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.bert.save_pretrained(out)  # type: ignore[operator]
    tokenizer.save_pretrained(out)
    torch.save({k: v.detach().cpu() for k, v in model.head.state_dict().items()}, out / HEAD_FILE)
    cfg = {
        "pooling": "cls",
        "hidden_size": int(model.head.in_features),
        "max_seq_len": int(max_seq_len),
        "input": "pair",
    }
    (out / RANKER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    return str(out)


def load_ranker(path: str | Path) -> tuple[CrossEncoder, dict[str, Any]]:
    """Inverse of :func:`save_ranker`."""
    p = Path(path)
    cfg = json.loads((p / RANKER_CONFIG).read_text())
    model = CrossEncoder(load_bert(p), hidden_size=int(cfg["hidden_size"]))
    model.head.load_state_dict(torch.load(p / HEAD_FILE, map_location="cpu", weights_only=True))
    return model, cfg


class CrossEncoderScorer(nn.Module):
    """The CTR ranker as served: the trained cross-encoder's logit and its sigmoid."""

    def __init__(self, ranker: CrossEncoder) -> None:
        super().__init__()
        self.ranker = ranker

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logit = self.ranker(input_ids, attention_mask, token_type_ids).unsqueeze(-1)
        return logit, torch.sigmoid(logit)  # (batch, 1) each: one score per pair


def load_scorer(path: str | Path) -> CrossEncoderScorer:
    """A ranker directory (:func:`save_ranker`) as served, in eval mode."""
    ranker, _ = load_ranker(path)
    return CrossEncoderScorer(ranker).eval()


def adamw(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay) with no decay on biases, LayerNorm weights and scalar
    parameters such as the retrieval temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)
