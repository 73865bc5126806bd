"""The feature ranker on validation windows inside the evaluation's training period.

``make train`` validates the feature ranker on the users active after its training/test
split, who are the users ``make eval`` tests: every look at that printout is a look at the
test split. This replays the stage on an earlier point instead: the evaluation's training
period is cut again at ``val_quantile``; the stage's cut-offs are taken inside the events
before that point (the same quantiles of that shorter period) and give the training groups,
and the users active after it are the validation groups, by the stage's own replay
(:func:`training.tasks.feature_ranker.replayed_groups`, which ``make train`` runs on the
whole training period). The
model is trained in this process with the stage's settings from ``make train``'s config
(:func:`training.steps.fit_in_process`; one process takes the workers' global batch) for a
few seeds, and compared on the same candidates with their popularity order (the
``popular`` source's rank), with their retrieval order (the sources fused as the gateway
fuses them: what it serves with the ranker off, the order the ranker has to beat) and with a
reciprocal-rank fusion of the ranker's and the popularity order, for all validation users
and per cohort (cold: at most the fold-in known)::

    python -m training.evaluation.ranker_validation --data third_party/movielens/ml-latest-small

The validation groups are the gateway's fused candidates, as served; ``--set fused=false``
trains on the union of the sources' lists instead, the replay before 2026-12-04.

Item vectors are the pretrained MiniLM's unless ``--content-model`` names another encoder (a
``make train`` item tower was fine-tuned on the whole evaluation training period, so it has
seen these windows' pairs). With ``feature_ranker.sequence`` (the default) the sequence
model is a source and two features, as in a ``make train`` release that serves it: the
training groups get a model trained on the events before each cut-off, the validation groups
one trained on all the events before the window's point (both in this process, with ``make
train``'s sequence settings and these item vectors as content); ``--set sequence=false``
replays without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from core import fusion
from core.config import get_settings
from core.ranking_features import FEATURES
from core.text import item_texts
from training.config import FeatureRankerConfig, SequenceConfig, load_config
from training.data import Dataset
from training.data.candidates import (
    Catalogue,
    SequenceAt,
    SequenceScores,
    split_at,
    training_cutoffs,
)
from training.models.sequence import twin_scorer
from training.steps import fit_in_process
from training.tasks.feature_ranker import (
    FeatureRankerTask,
    feature_scaling,
    group_ndcg,
    group_scores,
    replayed_groups,
    retrieval_order,
)

Groups = list[dict[str, Any]]


def sequence_scores(
    cfg: SequenceConfig, catalogue: Catalogue, events: pd.DataFrame
) -> SequenceScores:
    """A sequence model trained on ``events`` only, scoring the catalogue as served."""
    content = catalogue.vectors if cfg.use_content else None
    note = "<!-- sequence model on {events} events: {seconds:.0f} s -->"
    return twin_scorer(cfg, events, catalogue.item_ids, content, note)


def window_groups(
    catalogue: Catalogue,
    events: pd.DataFrame,
    cfg: FeatureRankerConfig,
    val_quantile: float,
    seed: int = 0,
    sequence: SequenceConfig | None = None,
) -> tuple[Groups, Groups]:
    """(training groups, validation groups) for the window at ``val_quantile`` of
    ``events`` (the evaluation's training period), with the sequence model when
    ``sequence`` is given and ``cfg.sequence`` on; see the module docstring."""
    (point,) = training_cutoffs(events, [val_quantile])
    inner, later = split_at(events, point)
    cuts = training_cutoffs(inner, cfg.cutoffs)
    twin_at: SequenceAt | None = None
    served: SequenceScores | None = None
    if sequence is not None and cfg.sequence:
        seq = sequence

        def twin_at(cut: pd.Timestamp) -> SequenceScores:
            return sequence_scores(seq, catalogue, inner[inner["timestamp"] < cut])

        served = sequence_scores(sequence, catalogue, inner)
    return replayed_groups(catalogue, inner, later, cfg, cuts, seed, twin_at, served)


def popularity_order(groups: Groups) -> list[np.ndarray]:
    """Each group's candidates scored by their rank in the ``popular`` source (ties, the
    candidates that source did not return, by their popularity)."""
    rr, pop = FEATURES.index("popular_rr"), FEATURES.index("popularity")
    return [g["features"][:, rr] + 1e-6 * g["features"][:, pop] for g in groups]


def is_cold(group: dict[str, Any], fold_in: int) -> bool:
    """At most ``fold_in`` positives known: the evaluation's cold-start users."""
    scaled = float(group["features"][0, FEATURES.index("history_len")])  # log1p(n) / 10
    return round(float(np.expm1(10 * scaled))) <= fold_in


def fused(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Reciprocal-rank fusion of two score vectors over the same candidates."""

    def ranks(x: np.ndarray) -> np.ndarray:
        out = np.empty(len(x), dtype=np.int64)
        out[np.argsort(-x, kind="stable")] = np.arange(len(x))
        return out

    return fusion.rrf(ranks(a)) + fusion.rrf(ranks(b))


def validate_window(
    catalogue: Catalogue,
    events: pd.DataFrame,
    cfg: FeatureRankerConfig,
    val_quantile: float,
    seeds: Sequence[int] = (0, 1, 2),
    sequence: SequenceConfig | None = None,
) -> dict[str, Any]:
    """Training/validation sizes, candidate recall, the popularity order's and the retrieval
    order's NDCG@10, and per seed the ranker's AUC and NDCG@10 and the fused order's; each
    NDCG also per cohort (``cold``: at most ``fold_in`` positives known, ``warm``: more)."""
    groups, held_out = window_groups(catalogue, events, cfg, val_quantile, sequence=sequence)
    if not groups or not held_out:
        raise ValueError(f"window {val_quantile}: no training or validation users")
    mean, std = feature_scaling(groups)
    cohorts = {
        "all": list(range(len(held_out))),
        "cold": [n for n, g in enumerate(held_out) if is_cold(g, cfg.fold_in)],
        "warm": [n for n, g in enumerate(held_out) if not is_cold(g, cfg.fold_in)],
    }

    def ndcg(scores: list[np.ndarray]) -> dict[str, float]:
        return {
            name: group_ndcg([held_out[n] for n in members], [scores[n] for n in members])
            for name, members in cohorts.items()
        }

    popular = popularity_order(held_out)
    runs = []
    for seed in seeds:
        task = FeatureRankerTask(cfg, mean, std)
        model = fit_in_process(task, groups, seed)
        metrics = task.evaluate(model, None, held_out, torch.device("cpu"))
        scores = group_scores(model, held_out)
        both = [fused(s, p) for s, p in zip(scores, popular, strict=True)]
        runs.append(
            {"seed": seed, "auc": metrics["auc"], "ranker": ndcg(scores), "fused": ndcg(both)}
        )
    return {
        "val_quantile": val_quantile,
        "training_users": len(groups),
        "validation_users": {name: len(members) for name, members in cohorts.items()},
        "candidate_recall": float(np.mean([g["labels"].sum() / g["targets"] for g in held_out])),
        "popularity": ndcg(popular),
        "retrieval": ndcg(retrieval_order(held_out, get_settings().retrieval_weights)),
        "runs": runs,
    }


def catalogue_for(ds: Dataset, encoder: Any) -> Catalogue:
    """Every catalogue item with its vector under ``encoder`` (``.encode(texts)``)."""
    texts = item_texts(ds.items)
    ids = [str(i) for i in ds.items["item_id"]]
    return Catalogue.build(ds.items, ids, encoder.encode([texts[i] for i in ids]))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.evaluation.ranker_validation")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--val-quantile", type=float, action="append", default=None)
    ap.add_argument("--test-quantile", type=float, default=0.8, help="as make eval's split")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--content-model", default="", help="encoder directory (default MiniLM)")
    ap.add_argument("--config", default="training/configs/local.yaml", help="make train's")
    ap.add_argument("--set", action="append", default=[], help="feature_ranker key=value")
    args = ap.parse_args(argv)
    from training.data import load_dataset
    from training.evaluation.protocol import make_split
    from training.models.text_encoder import TowerEncoder
    from training.pretrained import resolve_pretrained

    train_cfg = load_config(args.config, [f"feature_ranker.{kv}" for kv in args.set])
    # one process takes the global batch of make train's workers (same steps per epoch)
    cfg = train_cfg.feature_ranker
    cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size * train_cfg.num_workers)
    ds = load_dataset(args.data)
    events = make_split(ds, quantile=args.test_quantile).train.events
    encoder = TowerEncoder(resolve_pretrained(args.content_model), max_seq_len=64)
    catalogue = catalogue_for(ds, encoder)
    print(
        "| window | cohort | training users | validation users | candidate recall "
        "| popularity order | retrieval order | ranker (AUC) | ranker / popularity "
        "| ranker / retrieval | fused with popularity |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for q in args.val_quantile or [0.9, 0.8]:
        t0 = time.time()
        out = validate_window(
            catalogue, events, cfg, q, seeds=range(args.seeds), sequence=train_cfg.sequence
        )
        auc = float(np.mean([r["auc"] for r in out["runs"]]))
        for cohort, users in out["validation_users"].items():
            pop, ret = out["popularity"][cohort], out["retrieval"][cohort]
            ranker = float(np.mean([r["ranker"][cohort] for r in out["runs"]]))
            both = float(np.mean([r["fused"][cohort] for r in out["runs"]]))
            print(
                f"| {q} | {cohort} | {out['training_users']} | {users} "
                f"| {out['candidate_recall']:.3f} | {pop:.4f} | {ret:.4f} | {ranker:.4f} "
                f"({auc:.3f}) | {ranker / pop:.2f}x | {ranker / ret:.2f}x | {both:.4f} |",
                flush=True,
            )
        seeds = ", ".join(f"{r['ranker']['all']:.4f}" for r in out["runs"])
        print(f"<!-- window {q}: ranker per seed {seeds}; {time.time() - t0:.0f} s -->")
    return 0


if __name__ == "__main__":
    sys.exit(main())
