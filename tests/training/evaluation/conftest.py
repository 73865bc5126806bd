"""Small synthetic datasets in the generic format, and a tiny fake training checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GENRES = ["Action", "Comedy", "Drama", "Horror", "Sci-Fi"]


def rating_events(rows: list[tuple[str, str, int, float]]) -> pd.DataFrame:
    """An events frame from ``(user, item, epoch seconds, weight)`` rows, as rating events
    (value = weight x 5), in the loaders' column layout."""
    return pd.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "event_type": "rating",
            "timestamp": pd.to_datetime([r[2] for r in rows], unit="s", utc=True),
            "value": [r[3] * 5 for r in rows],
            "weight": [r[3] for r in rows],
        }
    )


def synthetic_generic(root: Path, *, users: int = 60, items: int = 80, seed: int = 0) -> Path:
    """``events.csv`` + ``items.csv``: users prefer one genre; item popularity is skewed;
    items ``i60``.. appear only late (new items after a 0.8 time cut-off)."""
    rng = np.random.default_rng(seed)
    item_genre = {f"i{n}": GENRES[n % len(GENRES)] for n in range(items)}
    rows = []
    t0 = 1_600_000_000
    for u in range(users):
        fav = GENRES[u % len(GENRES)]
        n_events = int(rng.integers(4, 25))
        start = int(rng.integers(0, 80 * 86400))
        for e in range(n_events):
            late = start + e * 3600 > 60 * 86400
            pool = [
                i
                for i, g in item_genre.items()
                if (g == fav or rng.random() < 0.2) and (late or int(i[1:]) < 60)
            ]
            w = np.array([1.0 / (1 + int(i[1:]) % 20) for i in pool])
            item = pool[int(rng.choice(len(pool), p=w / w.sum()))]
            rating = 5.0 if item_genre[item] == fav else float(rng.choice([2.0, 4.0]))
            rows.append((f"u{u}", item, "rating", t0 + start + e * 3600, rating))
    root.mkdir(parents=True, exist_ok=True)
    ev = pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "timestamp", "value"])
    ev.to_csv(root / "events.csv", index=False)
    it = pd.DataFrame(
        {
            "item_id": list(item_genre),
            "title": [f"Film number {n}" for n in range(items)],
            "categories": [item_genre[f"i{n}"] for n in range(items)],
            "description": [f"A {item_genre[f'i{n}'].lower()} story" for n in range(items)],
        }
    )
    it.to_csv(root / "items.csv", index=False)
    return root


@pytest.fixture(scope="session")
def generic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_generic(tmp_path_factory.mktemp("generic"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training output layout (``user_tower``, ``item_tower``, ``ranker``) made of tiny
    random BERTs: exercises the checkpoint systems without training anything."""
    import torch

    from training.pretrained import make_tiny_bert

    root = tmp_path_factory.mktemp("ckpt")
    meta = {"pooling": "mean", "normalize": True, "max_seq_len": 32, "shared_weights": False}
    for sub in ("user_tower", "item_tower"):
        make_tiny_bert(root / sub, seed=1)
        (root / sub / "tower_config.json").write_text(json.dumps(meta))
    make_tiny_bert(root / "ranker", seed=2)
    head = torch.nn.Linear(32, 1)
    torch.save(head.state_dict(), root / "ranker" / "head.pt")
    (root / "ranker" / "ranker_config.json").write_text(
        json.dumps({"pooling": "cls", "hidden_size": 32, "max_seq_len": 32, "input": "pair"})
    )
    (root / "train_config.yaml").write_text("history_len: 5\nmax_chars: 200\n")
    return root
