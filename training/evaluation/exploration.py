"""How far content-based exploration slots can carry new items, on validation windows.

#15 asks for new-item NDCG@10 > 0.02 with a *bounded* share of slots for new items scored
by content. This measures the ceiling of that design before building more of it: trending
popularity's list with its last ``n`` slots given to the ``n`` best new items (no training
event) by content similarity to the user's history, for several ``n``; the new-item NDCG@10
it buys and the all-target NDCG@10 it costs, for the users who have a new-item target.
Validation windows inside the evaluation's training period only (never the test users)::

    python -m training.evaluation.exploration --data third_party/movielens/ml-latest-small
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.data import Dataset
from training.evaluation import metrics as M
from training.evaluation.sequence_system import validation_split
from training.evaluation.systems import PretrainedContent, TrendingPopularity


def with_new_slots(base: list[str], new_best: list[str], n: int, k: int = 10) -> list[str]:
    """``base``'s first ``k - n`` items (none of the chosen new ones), then ``new_best[:n]``
    in the last slots: the gateway's placement (:func:`core.fusion.explore`) for a ``base``
    without new items, as trending popularity's lists are (that function would also count
    new items already in ``base`` against the ``n`` slots)."""
    extra = new_best[:n]
    taken = set(extra)
    return [i for i in base if i not in taken][: k - len(extra)] + extra


def exploration_ceiling(
    ds: Dataset,
    *,
    val_quantile: float = 0.9,
    slots: Sequence[int] = (0, 1, 2, 3, 5, 10),
    encoder: Any = None,
) -> dict[str, Any]:
    """``{"users", "new_items", "items", "rows": {n: (new-item NDCG@10, all NDCG@10)}}`` for
    the users of the validation window who have a new-item target."""
    split = validation_split(ds, val_quantile=val_quantile)
    slices = split.slices()
    users = [u for u in split.users if u in slices["new_items"]]
    content = PretrainedContent(encoder=encoder)
    content.fit(split.train)
    content.observe(split.observed)
    popular = TrendingPopularity()
    popular.fit(split.train)
    popular.observe(split.observed)
    is_new = np.array([i in split.new_items for i in content.item_ids])
    scores = np.where(is_new[None, :], content.full_scores(users), -np.inf)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    new_best = {
        u: [content.item_ids[i] for i in top[r] if np.isfinite(scores[r, i])]
        for r, u in enumerate(users)
    }
    base = popular.recommend(users, 10)
    rows: dict[int, tuple[float, float]] = {}
    for n in slots:
        recs = {u: with_new_slots(base[u], new_best[u], n) for u in users}
        new = M.per_user_ndcg(recs, slices["new_items"], 10)
        every = M.per_user_ndcg(recs, slices["all"], 10)
        rows[n] = (
            float(np.mean(list(new.values()))) if new else 0.0,
            float(np.mean([every.get(u, 0.0) for u in users])) if users else 0.0,
        )
    return {"users": len(users), "new_items": int(is_new.sum()), "items": len(is_new), "rows": rows}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.evaluation.exploration")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--val-quantile", type=float, action="append", default=None)
    args = ap.parse_args(argv)
    from training.data import load_dataset

    ds = load_dataset(args.data)
    for q in args.val_quantile or [0.9, 0.8]:
        out = exploration_ceiling(ds, val_quantile=q)
        print(
            f"validation window {q}: {out['users']} users with a new-item target, "
            f"{out['new_items']} new items of {out['items']}"
        )
        print("| new-item slots of 10 | new-item NDCG@10 | all-target NDCG@10 |")
        print("|---:|---:|---:|")
        for n, (new, every) in out["rows"].items():
            print(f"| {n} | {new:.4f} | {every:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
