"""The evaluation's thread cap and the cross-encoder as a scorer of (user text, item text)
pairs; the towers' text encoder is :class:`training.models.text_encoder.TowerEncoder`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.models.ranker import load_scorer
from training.pretrained import load_tokenizer


def set_threads(threads: int) -> None:
    """Cap torch's intra-op threads (the evaluation machine is shared)."""
    import torch

    torch.set_num_threads(max(1, threads))


class PairScorer:
    """The CTR cross-encoder (``<checkpoint>/ranker``): a logit per (user text, item text)."""

    def __init__(self, ranker_dir: str | Path, *, batch_size: int = 64) -> None:
        self.ranker_dir = str(ranker_dir)
        cfg_path = Path(ranker_dir) / "ranker_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self.max_seq_len = int(cfg.get("max_seq_len", 128))
        self.batch_size = batch_size
        self.tokenizer: Any = load_tokenizer(self.ranker_dir)
        self.module = load_scorer(self.ranker_dir)

    def score(self, user_texts: Sequence[str], item_texts: Sequence[str]) -> np.ndarray:
        import torch

        out = np.zeros(len(user_texts), dtype=np.float32)
        order = np.argsort([len(u) + len(i) for u, i in zip(user_texts, item_texts, strict=True)])
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                batch = self.tokenizer(
                    [user_texts[i] for i in idx],
                    [item_texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_seq_len,
                    return_tensors="pt",
                )
                tt = batch.get("token_type_ids")
                if tt is None:
                    tt = torch.zeros_like(batch["input_ids"])
                logit, _ = self.module(batch["input_ids"], batch["attention_mask"], tt)
                out[idx] = logit.reshape(-1).numpy()
        return out
