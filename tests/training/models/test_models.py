from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from training.models.metrics import log_loss, recall_at_k, roc_auc
from training.models.ranker import (
    CrossEncoder,
    adamw,
    encode_pairs,
    load_ranker,
    load_scorer,
    save_ranker,
)
from training.models.two_tower import (
    TwoTower,
    in_batch_softmax_loss,
    load_towers,
    mean_pool,
    save_towers,
)
from training.pretrained import load_bert, load_tokenizer, resolve_pretrained


def test_resolve_pretrained(tmp_path: Path) -> None:
    default = resolve_pretrained("")
    assert (Path(default) / "config.json").exists()
    assert resolve_pretrained(None) == default
    assert resolve_pretrained(str(tmp_path)) == str(tmp_path)
    with pytest.raises(FileNotFoundError):
        resolve_pretrained(str(tmp_path / "missing"))


def test_in_batch_loss_masks_false_negatives() -> None:
    u = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    plain = in_batch_softmax_loss(u, v, 20.0)
    logits = u @ v.T * 20.0
    assert plain == pytest.approx(torch.nn.functional.cross_entropy(logits, torch.arange(4)).item())
    # rows 0 and 1 share an item: each must not be pushed away from the other's copy
    items = torch.tensor([0, 0, 1, 2])
    users = torch.tensor([0, 1, 2, 3])
    masked = in_batch_softmax_loss(u, v, 20.0, users, items)
    m = logits.clone()
    m[0, 1] = m[1, 0] = -math.inf
    expect = torch.nn.functional.cross_entropy(m, torch.arange(4))
    assert masked.item() == pytest.approx(expect.item(), rel=1e-5)
    # perfect alignment with separate items -> loss near 0
    e = torch.eye(4)
    assert in_batch_softmax_loss(e, e, 100.0).item() < 1e-3


def test_two_tower_save_load_roundtrip(tiny_bert: str, tmp_path: Path) -> None:
    tok = load_tokenizer(tiny_bert)
    for shared in (True, False):
        m = TwoTower.from_pretrained(tiny_bert, shared_weights=shared, temperature=0.07)
        assert m.shared is shared
        n_params = sum(p.numel() for p in m.parameters())
        bert_params = sum(p.numel() for p in load_bert(tiny_bert).parameters())
        assert n_params == (1 if shared else 2) * bert_params + 1  # + log temperature
        out = tmp_path / f"shared_{shared}"
        save_towers(m, tok, out, max_seq_len=32)
        for tower in ("user_tower", "item_tower"):
            d = out / tower
            assert (d / "config.json").exists() and (d / "tokenizer.json").exists()
            meta = json.loads((d / "tower_config.json").read_text())
            assert meta["pooling"] == "mean" and meta["normalize"] is True
            assert meta["temperature"] == pytest.approx(0.07)
        enc = tok(["Heat (1995). Genres: Action", "a"], padding=True, return_tensors="pt")
        m.eval()
        with torch.no_grad():
            v1 = m.encode_items(enc["input_ids"], enc["attention_mask"])
            # the served recipe: plain HF BertModel + mean pool + L2 normalise
            bert = load_bert(out / "item_tower").eval()
            h = bert(**{k: enc[k] for k in ("input_ids", "attention_mask")}).last_hidden_state
            v2 = torch.nn.functional.normalize(mean_pool(h, enc["attention_mask"]), dim=-1)
            m2, meta2 = load_towers(out)
            v3 = m2.eval().encode_items(enc["input_ids"], enc["attention_mask"])
        assert torch.allclose(v1, v2, atol=1e-6) and torch.allclose(v1, v3, atol=1e-6)
        assert torch.allclose(v1.norm(dim=-1), torch.ones(2), atol=1e-5)
        assert meta2["shared_weights"] is shared


def test_ranker_save_format(tiny_bert: str, tmp_path: Path) -> None:
    tok = load_tokenizer(tiny_bert)
    m = CrossEncoder.from_pretrained(tiny_bert).eval()
    out = Path(save_ranker(m, tok, tmp_path / "ranker", max_seq_len=48))
    cfg = json.loads((out / "ranker_config.json").read_text())
    assert cfg["pooling"] == "cls" and cfg["hidden_size"] == 32 and cfg["max_seq_len"] == 48
    head = torch.load(out / "head.pt", weights_only=True)
    assert set(head) == {"weight", "bias"} and head["weight"].shape == (1, 32)
    enc = encode_pairs(tok, ["Recently liked: Heat (1995)"], ["Toy Story (1995)"], 48)
    assert enc["token_type_ids"].max().item() == 1  # [CLS] user [SEP] item [SEP]
    m2, _ = load_ranker(out)
    with torch.no_grad():
        assert torch.allclose(m(**enc), m2.eval()(**enc), atol=1e-6)
    # the served form (what the export traces) reads the same directory
    served = load_scorer(str(out))
    with torch.no_grad():
        logit, _prob = served(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    assert torch.allclose(logit.squeeze(-1), m(**enc), atol=1e-5)


def test_adamw_decay_groups(tiny_bert: str) -> None:
    m = TwoTower.from_pretrained(tiny_bert)
    opt = adamw(m, 1e-3, 0.05)
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert any(p is m.log_scale for p in no_decay["params"])
    assert all(p.ndim >= 2 for p in decay["params"])
    # the unused BERT pooler is frozen so DDP does not wait for its gradients
    pooler: Any = m.user_bert.pooler
    assert all(not p.requires_grad for p in pooler.parameters())


def test_metrics() -> None:
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert math.isnan(roc_auc([1, 1], [0.1, 0.2]))
    assert log_loss([1, 0], [0.5, 0.5]) == pytest.approx(math.log(2))
    assert log_loss([1], [1.0]) < 1e-6
    ranked = [["a", "b", "c"], ["x", "y"]]
    assert recall_at_k(ranked, [["a", "z"], ["y"]], k=2) == pytest.approx((0.5 + 1.0) / 2)
    assert recall_at_k(ranked, [["c"], []], k=2) == 0.0
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.random(200)
    # rank-sum AUC equals the pairwise definition
    pairs = [(a > b) + 0.5 * (a == b) for a in s[y == 1] for b in s[y == 0]]
    assert roc_auc(y, s) == pytest.approx(np.mean(pairs))


def test_default_model_is_minilm() -> None:
    tok = load_tokenizer(resolve_pretrained(""))
    assert tok("hello")["input_ids"][0] == tok.cls_token_id
    cfg = json.loads((Path(resolve_pretrained("")) / "config.json").read_text())
    assert cfg["hidden_size"] == 384
