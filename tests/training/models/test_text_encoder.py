"""``TowerEncoder``: the served tower's vectors, whatever the batching, and a disk cache that a
retrained model never hits."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from training.models.text_encoder import TowerEncoder
from training.models.two_tower import PooledEncoder
from training.pretrained import load_bert, load_tokenizer

TEXTS = ["Heat (1995)", "", "Toy Story (1995) Adventure|Animation|Children", "a" * 300]


def test_vectors_are_the_served_towers_one_text_at_a_time(tiny_bert: str) -> None:
    enc = TowerEncoder(tiny_bert, max_seq_len=64, batch_size=2, cache_dir=None)
    got = enc.encode(TEXTS)
    tok, module = load_tokenizer(tiny_bert), PooledEncoder(load_bert(tiny_bert)).eval()
    with torch.inference_mode():
        for i, text in enumerate(TEXTS):
            batch = tok([text or " "], truncation=True, max_length=64, return_tensors="pt")
            one = module(batch["input_ids"], batch["attention_mask"]).numpy()[0]
            np.testing.assert_allclose(got[i], one, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_the_cache_is_keyed_by_weights_length_and_texts(tiny_bert: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = TowerEncoder(tiny_bert, max_seq_len=64, cache_dir=cache).encode(TEXTS)
    assert len(list(cache.glob("emb-*.npy"))) == 1
    again = TowerEncoder(tiny_bert, max_seq_len=64, cache_dir=cache).encode(TEXTS)
    np.testing.assert_array_equal(first, again)
    assert len(list(cache.glob("emb-*.npy"))) == 1  # read back, not written again
    TowerEncoder(tiny_bert, max_seq_len=32, cache_dir=cache).encode(TEXTS)
    TowerEncoder(tiny_bert, max_seq_len=64, cache_dir=cache).encode(TEXTS[:3])
    assert len(list(cache.glob("emb-*.npy"))) == 3

    retrained = tmp_path / "retrained"
    shutil.copytree(tiny_bert, retrained)
    bert = load_bert(retrained)
    with torch.no_grad():
        for p in bert.parameters():
            p.add_(0.01)
    bert.save_pretrained(retrained)
    moved = TowerEncoder(retrained, max_seq_len=64, cache_dir=cache).encode(TEXTS)
    assert len(list(cache.glob("emb-*.npy"))) == 4
    assert not np.allclose(moved, first, atol=1e-4)
