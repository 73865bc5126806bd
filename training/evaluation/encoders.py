"""BERT text encoders for offline evaluation: towers (mean pool + L2 norm) and the ranker.

Item embeddings are the slow part on CPU (~40 s for the 9.7k MovieLens titles with MiniLM on
two cores), and every evaluation run embeds the same catalogue again, so matrices are cached
under ``var/cache/eval/`` keyed by a hash of the model weights, the sequence length and the
texts: a retrained model or edited catalogue can never hit a stale entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.paths import REPO_ROOT

log = logging.getLogger(__name__)
DEFAULT_CACHE = REPO_ROOT / "var" / "cache" / "eval"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 over the config and weight files of a HF directory (content, not mtime)."""
    root = Path(model_dir)
    h = hashlib.sha256()
    names = ("config.json", "model.safetensors", "pytorch_model.bin", "head.pt")
    for name in names:
        p = root / name
        if p.exists():
            h.update(name.encode())
            with p.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def set_threads(threads: int) -> None:
    """Cap torch's intra-op threads (the evaluation machine is shared)."""
    import torch

    torch.set_num_threads(max(1, threads))


class TowerEncoder:
    """A BERT tower as served: ``normalize(mean_pool(last_hidden_state))``, batched by length."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        max_seq_len: int = 128,
        batch_size: int = 64,
        cache_dir: Path | None = DEFAULT_CACHE,
    ) -> None:
        from transformers import AutoTokenizer

        from training.export.onnx_export import PooledEncoder, load_bert

        self.model_dir = str(model_dir)
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.tokenizer: Any = AutoTokenizer.from_pretrained(self.model_dir)
        self.module = PooledEncoder(load_bert(self.model_dir)).eval()
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model_dir)
        return self._fingerprint

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        order = np.argsort([len(t) for t in texts], kind="stable")
        dim = None
        out: np.ndarray | None = None
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                idx = order[start : start + self.batch_size]
                batch = self.tokenizer(
                    [texts[i] or " " for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_seq_len,
                    return_tensors="pt",
                )
                vecs = self.module(batch["input_ids"], batch["attention_mask"]).numpy()
                if out is None:
                    dim = vecs.shape[1]
                    out = np.zeros((len(texts), dim), dtype=np.float32)
                out[idx] = vecs
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)

    def encode(self, texts: Sequence[str], *, cache: bool = True) -> np.ndarray:
        """``(len(texts), dim)`` float32 unit vectors, from the cache when possible."""
        if not cache or self.cache_dir is None:
            return self._encode(texts)
        h = hashlib.sha256()
        h.update(f"{self.fingerprint}:{self.max_seq_len}:".encode())
        for t in texts:
            h.update(t.encode())
            h.update(b"\x00")
        path = self.cache_dir / f"emb-{h.hexdigest()[:32]}.npy"
        if path.exists():
            log.info("embeddings from cache %s", path)
            return np.load(path)
        vecs = self._encode(texts)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, vecs)
        tmp.replace(path)
        return vecs


class PairScorer:
    """The CTR cross-encoder (``<checkpoint>/ranker``): a logit per (user text, item text)."""

    def __init__(self, ranker_dir: str | Path, *, batch_size: int = 64) -> None:
        from transformers import AutoTokenizer

        from training.export.onnx_export import load_ranker

        self.ranker_dir = str(ranker_dir)
        cfg_path = Path(ranker_dir) / "ranker_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self.max_seq_len = int(cfg.get("max_seq_len", 128))
        self.batch_size = batch_size
        self.tokenizer: Any = AutoTokenizer.from_pretrained(self.ranker_dir)
        self.module = load_ranker(self.ranker_dir)

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
