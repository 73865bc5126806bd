"""The two-tower retriever as a :class:`~training.tasks.base.Task`: in-batch softmax over
(user text, positive item text) pairs, Recall@K on validation users.

Also the tower-based ranking helpers: evaluation, and hard-negative mining for the ranker
(:func:`mine_with_towers`) and the catalogue's item vectors for the feature ranker's
training data (:func:`tower_vectors`), both run by the driver as Ray tasks.

Checkpoint format: ``user_tower/`` and ``item_tower/`` (see :mod:`training.models.two_tower`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from training.config import RetrievalConfig
from training.models.metrics import recall_at_k
from training.models.two_tower import (
    TwoTower,
    encode,
    in_batch_softmax_loss,
    load_towers,
    save_towers,
)
from training.precision import use_bf16
from training.prepare import RetrievalEval
from training.pretrained import load_bert, load_tokenizer, set_offline
from training.tasks.base import Batch, Row, Task


class RetrievalCollator:
    """Tokenises users and items separately and numbers the distinct user/item ids of the
    batch, so the loss can mask in-batch false negatives."""

    def __init__(self, tokenizer: Any, max_seq_len: int) -> None:
        self.tok = tokenizer
        self.max_len = max_seq_len

    def __call__(self, rows: Sequence[Row]) -> Batch:
        u = self.tok(
            [r["user_text"] for r in rows],
            truncation=True,
            max_length=self.max_len,
            padding=True,
            return_tensors="pt",
        )
        i = self.tok(
            [r["item_text"] for r in rows],
            truncation=True,
            max_length=self.max_len,
            padding=True,
            return_tensors="pt",
        )
        users = {x: k for k, x in enumerate(dict.fromkeys(r["user_id"] for r in rows))}
        items = {x: k for k, x in enumerate(dict.fromkeys(r["item_id"] for r in rows))}
        return {
            "user_input_ids": u["input_ids"],
            "user_attention_mask": u["attention_mask"],
            "item_input_ids": i["input_ids"],
            "item_attention_mask": i["attention_mask"],
            "user_idx": torch.tensor([users[r["user_id"]] for r in rows]),
            "item_idx": torch.tensor([items[r["item_id"]] for r in rows]),
        }


@torch.no_grad()
def encode_texts(
    encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_seq_len: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    bf16: bool = False,
) -> torch.Tensor:
    """Normalised vectors for ``texts`` (batched, length-sorted to limit padding); ``bf16``:
    bf16 matrix products where ``training.precision`` allows them (a CPU with bf16
    instructions), fp32 elsewhere."""
    autocast = use_bf16(bf16, device)
    order = sorted(range(len(texts)), key=lambda k: len(texts[k]))
    out: list[torch.Tensor | None] = [None] * len(texts)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        enc = tokenizer(
            [texts[k] for k in idx],
            truncation=True,
            max_length=max_seq_len,
            padding=True,
            return_tensors="pt",
        )
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            vecs = encode(enc["input_ids"].to(device), enc["attention_mask"].to(device))
        vecs = vecs.float().cpu()
        for j, k in enumerate(idx):
            out[k] = vecs[j]
    if not texts:
        return torch.empty(0, 0)
    return torch.stack([v for v in out if v is not None])


@torch.no_grad()
def top_k_items(
    model: TwoTower,
    tokenizer: Any,
    user_texts: Sequence[str],
    item_ids: Sequence[str],
    item_texts: Sequence[str],
    *,
    k: int,
    exclude: Sequence[set[str]] | None = None,
    max_seq_len: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    bf16: bool = False,
) -> list[list[str]]:
    """The ``k`` best items per user by inner product, skipping ``exclude[u]``."""
    model.eval()
    item_vecs = encode_texts(
        model.encode_items,
        tokenizer,
        item_texts,
        max_seq_len=max_seq_len,
        batch_size=batch_size,
        device=device,
        bf16=bf16,
    )
    user_vecs = encode_texts(
        model.encode_users,
        tokenizer,
        user_texts,
        max_seq_len=max_seq_len,
        batch_size=batch_size,
        device=device,
        bf16=bf16,
    )
    scores = user_vecs @ item_vecs.T
    pos = {iid: j for j, iid in enumerate(item_ids)}
    if exclude is not None:
        for u, ex in enumerate(exclude):
            cols = [pos[i] for i in ex if i in pos]
            if cols:
                scores[u, cols] = float("-inf")
    kk = min(k, len(item_ids))
    top = scores.topk(kk, dim=1).indices.tolist()
    return [[item_ids[j] for j in row] for row in top]


def evaluate_retrieval(
    model: TwoTower,
    tokenizer: Any,
    eval_data: RetrievalEval,
    *,
    k: int,
    max_seq_len: int,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Recall@K and hit rate@K of the validation users over the candidate items, their
    training positives excluded (they are not recommended again)."""
    users = eval_data.users
    if not users:
        return {}
    ranked = top_k_items(
        model,
        tokenizer,
        [u["user_text"] for u in users],
        eval_data.item_ids,
        eval_data.item_texts,
        k=k,
        exclude=[set(u["seen"]) for u in users],
        max_seq_len=max_seq_len,
        batch_size=batch_size,
        device=device,
    )
    recall = recall_at_k(ranked, [u["relevant"] for u in users], k)
    hit = float(
        np.mean([bool(set(r) & set(u["relevant"])) for r, u in zip(ranked, users, strict=True)])
    )
    return {
        f"recall_at_{k}": recall,
        f"hit_rate_at_{k}": hit,
        "eval_users": float(len(users)),
        "eval_candidates": float(len(eval_data.item_ids)),
    }


def mine_with_towers(
    towers_dir: str,
    user_texts: list[str],
    exclude: list[set[str]],
    item_ids: list[str],
    item_texts: list[str],
    top_k: int,
    max_seq_len: int,
    threads: int = 0,
    bf16: bool = False,
) -> list[list[str]]:
    """Top-``top_k`` items per user text under saved towers (hard-negative mining); ``bf16``:
    bf16 products where the CPU has bf16 instructions (``training.precision``)."""
    set_offline()
    if threads > 0:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_towers(towers_dir)
    model.to(device)
    tok = load_tokenizer(Path(towers_dir) / "user_tower")
    return top_k_items(
        model,
        tok,
        user_texts,
        item_ids,
        item_texts,
        k=top_k,
        exclude=exclude,
        max_seq_len=max_seq_len,
        device=device,
        bf16=bf16,
    )


def tower_vectors(
    towers_dir: str, texts: list[str], max_seq_len: int, threads: int = 0, bf16: bool = False
) -> np.ndarray:
    """Unit vectors of ``texts`` under a saved item tower (``towers_dir`` is the tower's own
    directory), as indexing writes them into Milvus; float32 ``(len(texts), dim)``. ``bf16``:
    bf16 products where the CPU has bf16 instructions (``training.precision``)."""
    set_offline()
    if threads > 0:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bert = load_bert(towers_dir).to(device).eval()
    tok = load_tokenizer(Path(towers_dir))

    def pooled(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return encode(bert, ids, mask)

    vectors = encode_texts(pooled, tok, texts, max_seq_len=max_seq_len, device=device, bf16=bf16)
    return vectors.numpy().astype(np.float32)


@dataclass
class RetrievalTask(Task[TwoTower, RetrievalEval]):
    """Two-tower training with in-batch sampled softmax (see :mod:`training.models.two_tower`)."""

    cfg: RetrievalConfig
    name: ClassVar[str] = "retrieval"

    def build_model(self, pretrained: str) -> TwoTower:
        return TwoTower.from_pretrained(
            pretrained,
            shared_weights=self.cfg.shared_weights,
            temperature=self.cfg.temperature,
            learn_temperature=self.cfg.learn_temperature,
        )

    def load_model(self, checkpoint: Path) -> TwoTower:
        return load_towers(checkpoint, learn_temperature=self.cfg.learn_temperature)[0]

    def save_model(self, model: TwoTower, tokenizer: Any, checkpoint: Path) -> None:
        save_towers(model, tokenizer, checkpoint, max_seq_len=self.cfg.max_seq_len)

    def collator(self, tokenizer: Any) -> RetrievalCollator:
        return RetrievalCollator(tokenizer, self.cfg.max_seq_len)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        u, v, scale = model(
            batch["user_input_ids"],
            batch["user_attention_mask"],
            batch["item_input_ids"],
            batch["item_attention_mask"],
        )
        return in_batch_softmax_loss(u, v, scale, batch["user_idx"], batch["item_idx"])

    def evaluate(
        self, model: TwoTower, tokenizer: Any, data: RetrievalEval, device: torch.device
    ) -> dict[str, float]:
        return evaluate_retrieval(
            model,
            tokenizer,
            data,
            k=self.cfg.k,
            max_seq_len=self.cfg.max_seq_len,
            batch_size=self.cfg.eval_batch_size,
            device=device,
        )

    def progress(self, model: TwoTower) -> dict[str, float]:
        return {"temperature": model.temperature}  # learnable: worth watching
