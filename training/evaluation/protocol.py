"""The evaluation protocol: a global time split plus a small per-user fold-in.

1. ``time_split`` at a global cut-off (default: the 0.8 quantile of event times): models are
   fitted only on events strictly before it.
2. Test users are users with a positive event after the cut-off. With a global cut-off most
   such users are *new* (on ml-latest-small 88 of 116 have no training event at all), and
   with no history every system can only serve popularity. The live system learns about a
   user from ``IngestEvents`` before their next ``Recommend``, so the protocol reveals each
   test user's first ``fold_in`` post-cut-off events (chronologically; at most all but one)
   as history - *not* as training data - and predicts the rest.
3. Targets: the user's remaining positive events (``weight > 0``) on items not already in
   their known events (train + fold-in). Users left without targets are dropped.
4. Slices: ``all``; ``cold_start`` = users with at most ``cold_max_events`` known events
   (train + fold-in) at recommendation time; ``new_items`` = targets restricted to items
   with no training event at all (users without such targets are not in the slice).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from training.data.schema import Dataset
from training.data.split import time_split


@dataclass
class EvalSplit:
    """Everything the harness needs to fit, fold in and score."""

    train: Dataset
    observed: pd.DataFrame
    targets: dict[str, set[str]]
    known_events: dict[str, int]
    new_items: set[str]
    cutoff: pd.Timestamp | None
    params: dict[str, object] = field(default_factory=dict)

    @property
    def users(self) -> list[str]:
        return sorted(self.targets)

    def slices(self, cold_max_events: int = 3) -> dict[str, dict[str, set[str]]]:
        """``slice name -> user -> relevant items`` (see module docstring)."""
        cold = {
            u: rel
            for u, rel in self.targets.items()
            if self.known_events.get(u, 0) <= cold_max_events
        }
        new = {u: rel & self.new_items for u, rel in self.targets.items()}
        return {
            "all": dict(self.targets),
            "cold_start": cold,
            "new_items": {u: r for u, r in new.items() if r},
        }


def make_split(
    ds: Dataset,
    *,
    quantile: float = 0.8,
    cutoff: str | None = None,
    fold_in: int = 3,
    max_users: int | None = None,
    seed: int = 0,
) -> EvalSplit:
    """Build the :class:`EvalSplit` of ``ds`` (see module docstring)."""
    train_ev, test_ev = time_split(ds.events, cutoff=cutoff, quantile=quantile)
    train = Dataset(train_ev, ds.items, ds.report)
    train_counts = train_ev.groupby("user_id").size().to_dict()
    train_items_by_user = {u: set(g) for u, g in train_ev.groupby("user_id")["item_id"]}
    test_ev = test_ev.reset_index(drop=True)
    test_ev["_order"] = np.arange(len(test_ev))
    test_ev = test_ev.sort_values(["user_id", "timestamp", "_order"], kind="stable")
    observed_parts: list[pd.DataFrame] = []
    targets: dict[str, set[str]] = {}
    known: dict[str, int] = {}
    for uid, g in test_ev.groupby("user_id", sort=True):
        if not (g["weight"] > 0).any():
            continue
        n_reveal = min(fold_in, len(g) - 1) if fold_in > 0 else 0
        revealed, rest = g.iloc[:n_reveal], g.iloc[n_reveal:]
        seen = train_items_by_user.get(uid, set()) | set(revealed["item_id"])
        rel = set(rest.loc[rest["weight"] > 0, "item_id"]) - seen
        if not rel:
            continue
        targets[str(uid)] = {str(i) for i in rel}
        known[str(uid)] = int(train_counts.get(uid, 0)) + len(revealed)
        if len(revealed):
            observed_parts.append(revealed)
    if max_users is not None and len(targets) > max_users:
        rng = np.random.default_rng(seed)
        keep = set(rng.choice(sorted(targets), size=max_users, replace=False).tolist())
        targets = {u: r for u, r in targets.items() if u in keep}
        known = {u: n for u, n in known.items() if u in keep}
        observed_parts = [p for p in observed_parts if str(p["user_id"].iloc[0]) in keep]
    observed = (
        pd.concat(observed_parts, ignore_index=True).drop(columns="_order")
        if observed_parts
        else test_ev.iloc[0:0].drop(columns="_order")
    )
    new_items = set(map(str, ds.items["item_id"])) - set(map(str, train_ev["item_id"]))
    cut = test_ev["timestamp"].min() if len(test_ev) else None
    return EvalSplit(
        train=train,
        observed=observed,
        targets=targets,
        known_events=known,
        new_items=new_items,
        cutoff=cut,
        params={
            "kind": "global time cut-off",
            "quantile": None if cutoff else quantile,
            "cutoff": str(cutoff) if cutoff else None,
            "first_test_event": str(cut) if cut is not None else None,
            "train_events": len(train_ev),
            "test_events": len(test_ev),
            "fold_in": fold_in,
            "max_users": max_users,
            "seed": seed,
        },
    )
