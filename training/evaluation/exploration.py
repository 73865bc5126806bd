"""What exploration slots carry for new items, and in which order to fill them, on validation
windows.

#15 asks for new-item NDCG@10 > 0.02 with a *bounded* share of slots for new items scored
by content. This measures that design before the gateway runs it: trending popularity's
list with its last ``n`` slots given to new items (no training event) that exist at the
user's fold-in point (created by then, or with no creation time: what the gateway's
catalogue holds then), for several ``n``; the new-item NDCG@10 it buys and the all-target
NDCG@10 it costs, for the users who have a new-item target. The slots are filled as the
gateway fills them (:func:`core.fusion.slot_order`): the newest of the ``pool`` best
content matches first, for several ``pool`` sizes (1: best content match first).
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
import pandas as pd

from core import fusion
from core.exploration import with_new_slots
from training.data import Dataset
from training.data.candidates import creation_seconds
from training.evaluation import metrics as M
from training.evaluation.sequence_system import validation_split
from training.evaluation.systems import PretrainedContent, TrendingPopularity

SLOTS = (0, 1, 2, 3, 5, 10)
POOLS = (1, 10, 20, 50)
SHOWN = 10


def exploration_ceiling(
    ds: Dataset,
    *,
    val_quantile: float = 0.9,
    slots: Sequence[int] = SLOTS,
    pools: Sequence[int] = POOLS,
    encoder: Any = None,
) -> dict[str, Any]:
    """``{"users", "new_items", "items", "rows": {pool: {n: (new-item NDCG@10, all
    NDCG@10)}}}`` for the users of the validation window who have a new-item target."""
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
    created = creation_seconds(ds.items, content.item_ids)  # 0: unknown
    observed = split.observed.groupby(split.observed["user_id"].astype(str))["timestamp"].max()
    cutoff = split.cutoff if split.cutoff is not None else split.train.events["timestamp"].max()
    scores = content.full_scores(users)
    base = popular.recommend(users, SHOWN)
    best: dict[int, dict[str, list[str]]] = {pool: {} for pool in pools}
    for r, user in enumerate(users):
        now = pd.Timestamp(observed.get(user, cutoff)).timestamp()
        exists = is_new & (created <= now)  # no creation time: exists
        ages = np.where(created > 0, now - created, np.inf).tolist()
        for pool in pools:
            order = fusion.slot_order(scores[r], exists, ages, pool)
            best[pool][user] = [content.item_ids[i] for i in order[:SHOWN]]
    rows: dict[int, dict[int, tuple[float, float]]] = {}
    for pool in pools:
        rows[pool] = {}
        for n in slots:
            recs = {u: with_new_slots(base[u], best[pool][u], n) for u in users}
            new = M.per_user_ndcg(recs, slices["new_items"], SHOWN)
            every = M.per_user_ndcg(recs, slices["all"], SHOWN)
            rows[pool][n] = (
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
        pools = list(out["rows"])
        print(
            f"\nvalidation window {q}: {out['users']} users with a new-item target, "
            f"{out['new_items']} new items of {out['items']}; new-item NDCG@10 / all-target "
            "NDCG@10, slots filled newest first among the `pool` best content matches"
        )
        print("| new-item slots of 10 | " + " | ".join(f"pool {p}" for p in pools) + " |")
        print("|---:|" + "---:|" * len(pools))
        for n in out["rows"][pools[0]]:
            cells = [out["rows"][p][n] for p in pools]
            row = " | ".join(f"{new:.4f} / {every:.3f}" for new, every in cells)
            print(f"| {n} | {row} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
