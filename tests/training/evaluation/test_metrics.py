"""Metric functions against hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.evaluation import metrics as M

RANKED = ["a", "b", "c", "d", "e"]
RELEVANT = {"b", "d", "z"}  # hits at ranks 2 and 4; "z" never recommended


def test_recall_truncated_denominator() -> None:
    # top 2 = a, b -> 1 hit; denominator min(2, 3) = 2
    assert M.recall_at_k(RANKED, RELEVANT, 2) == pytest.approx(0.5)
    # top 5 -> 2 hits over min(5, 3) = 3
    assert M.recall_at_k(RANKED, RELEVANT, 5) == pytest.approx(2 / 3)
    assert M.recall_at_k(RANKED, set(), 5) == 0.0


def test_ndcg_hand_computed() -> None:
    # DCG@5 = 1/log2(3) + 1/log2(5); IDCG@5 (3 relevant) = 1 + 1/log2(3) + 1/log2(4)
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert M.ndcg_at_k(RANKED, RELEVANT, 5) == pytest.approx(dcg / idcg)
    # k=2: DCG = 1/log2(3); IDCG has min(2, 3) = 2 hits = 1 + 1/log2(3)
    assert M.ndcg_at_k(RANKED, RELEVANT, 2) == pytest.approx(
        (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    )
    assert M.ndcg_at_k(["b", "d"], {"b", "d"}, 10) == pytest.approx(1.0)
    assert M.ndcg_at_k(["x"], {"b"}, 10) == 0.0


def test_mrr_and_hit_rate() -> None:
    assert M.reciprocal_rank(RANKED, RELEVANT, 20) == pytest.approx(0.5)
    assert M.reciprocal_rank(RANKED, RELEVANT, 1) == 0.0
    assert M.hit_rate_at_k(RANKED, RELEVANT, 1) == 0.0
    assert M.hit_rate_at_k(RANKED, RELEVANT, 2) == 1.0


def test_coverage() -> None:
    lists = [["a", "b", "c"], ["b", "c", "d"]]
    # top 2: {a, b} | {b, c} = 3 of 10
    assert M.catalogue_coverage(lists, 10, 2) == pytest.approx(0.3)
    assert M.catalogue_coverage(lists, 0, 2) == 0.0


def test_intra_list_diversity() -> None:
    vecs = {
        "a": np.array([1.0, 0.0]),
        "b": np.array([0.0, 1.0]),
        "c": np.array([1.0, 1.0]),
        "z": np.array([0.0, 0.0]),
    }
    # pairs: (a,b) 1 - 0 = 1; (a,c) 1 - 1/sqrt2; (b,c) 1 - 1/sqrt2
    expected = (1 + 2 * (1 - 1 / math.sqrt(2))) / 3
    assert M.intra_list_diversity(["a", "b", "c", "z"], vecs, 10) == pytest.approx(expected)
    assert M.intra_list_diversity(["a", "a"], vecs, 10) == pytest.approx(0.0)
    assert M.intra_list_diversity(["a"], vecs, 10) is None


def test_novelty() -> None:
    # 3 training users; item x liked by 1 -> p = 2/4, y by 3 -> p = 4/4
    info = M.self_information({"x": 1, "y": 3}, 3)
    assert info["x"] == pytest.approx(1.0)
    assert info["y"] == pytest.approx(0.0)
    default = -math.log2(1 / 4)  # never seen: (0 + 1) / (3 + 1)
    assert M.novelty(["x", "y", "new"], info, default, 10) == pytest.approx((1 + 0 + 2) / 3)


def test_evaluate_lists_aggregates_and_skips_empty() -> None:
    recs = {"u1": ["a", "b"], "u2": ["c"], "u3": ["a"]}
    rel = {"u1": {"b"}, "u2": {"x"}, "u3": set()}  # u3 has no targets: skipped
    m = M.evaluate_lists(recs, rel, catalogue_size=4, recall_ks=(1, 2), k=2, mrr_k=2)
    assert m["users"] == 2
    assert m["recall@1"] == 0.0
    assert m["recall@2"] == pytest.approx(0.5)  # u1 1/1, u2 0
    assert m["mrr@2"] == pytest.approx(0.25)  # u1 1/2, u2 0
    assert m["hit_rate@2"] == pytest.approx(0.5)
    assert m["coverage@2"] == pytest.approx(3 / 4)  # a, b, c


def test_paired_bootstrap_brackets_the_mean() -> None:
    a = {f"u{i}": 0.5 for i in range(50)}
    b = {f"u{i}": 0.3 if i % 2 else 0.4 for i in range(50)}
    out = M.paired_bootstrap(a, b, samples=500, seed=1)
    assert out["diff"] == pytest.approx(0.15)
    assert out["low"] <= 0.15 <= out["high"]
    assert out["users"] == 50
