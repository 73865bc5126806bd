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
4. Slices: ``all``; ``warm`` and ``cold_start`` = users with more / at most
   ``cold_max_events`` known events (train + fold-in) at recommendation time; ``new_items``
   = targets restricted to items with no training event at all (users without such targets
   are not in the slice).

Targets up to two years ahead reward popularity: even an oracle ranked by the test period's
own popularity reaches only 1.03x time-decayed popularity on ml-latest-small. A served
recommender is for the near future, so the same fold-in point also gets **next-items**
targets (the same recommendations, scored against other targets; nothing is refitted):

5. ``next_items``: the user's next ``NEXT_ITEMS`` (10) unseen positive items after the
   fold-in point, in time order; ties at the 10th item's timestamp are all kept (28% of
   ml-latest-small's events share a second with another event of the same user, and their
   file order is no real order). ``next_items_warm`` / ``next_items_cold``: the same for the
   warm and cold-start users. ``next_30_days``: the unseen positives within ``NEXT_DAYS``
   (30) days of the fold-in point (the last revealed event, else the cut-off); users with
   none are not in that slice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from training.data.schema import Dataset
from training.data.split import time_split

NEXT_ITEMS = 10
NEXT_DAYS = 30.0


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
    #: next-items targets (module docstring, 5): same users, nearer targets
    next_items: dict[str, set[str]] = field(default_factory=dict)
    next_window: dict[str, set[str]] = field(default_factory=dict)

    @property
    def users(self) -> list[str]:
        return sorted(self.targets)

    def slices(self, cold_max_events: int = 3) -> dict[str, dict[str, set[str]]]:
        """``slice name -> user -> relevant items`` (see module docstring)."""

        def cold(u: str) -> bool:
            return self.known_events.get(u, 0) <= cold_max_events

        new = {u: rel & self.new_items for u, rel in self.targets.items()}
        return {
            "all": dict(self.targets),
            "warm": {u: r for u, r in self.targets.items() if not cold(u)},
            "cold_start": {u: r for u, r in self.targets.items() if cold(u)},
            "new_items": {u: r for u, r in new.items() if r},
            "next_items": dict(self.next_items),
            "next_items_warm": {u: r for u, r in self.next_items.items() if not cold(u)},
            "next_items_cold": {u: r for u, r in self.next_items.items() if cold(u)},
            "next_30_days": {u: r for u, r in self.next_window.items() if r},
        }


def next_targets(
    later: pd.DataFrame, seen: set[str], anchor: pd.Timestamp | None
) -> tuple[set[str], set[str]]:
    """(next ``NEXT_ITEMS`` unseen positives, ties kept; unseen positives within
    ``NEXT_DAYS`` of ``anchor``) from ``later``, one user's events after the fold-in point
    in time order."""
    pos = later[(later["weight"] > 0) & ~later["item_id"].isin(seen)]
    pos = pos.drop_duplicates("item_id", keep="first")
    if pos.empty:
        return set(), set()
    last = pos["timestamp"].iloc[min(NEXT_ITEMS, len(pos)) - 1]
    nxt = {str(i) for i in pos.loc[pos["timestamp"] <= last, "item_id"]}
    if anchor is None:
        return nxt, set()
    horizon = anchor + pd.Timedelta(days=NEXT_DAYS)
    return nxt, {str(i) for i in pos.loc[pos["timestamp"] <= horizon, "item_id"]}


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
    next_items: dict[str, set[str]] = {}
    next_window: dict[str, set[str]] = {}
    known: dict[str, int] = {}
    first_test = test_ev["timestamp"].min() if len(test_ev) else None
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
        anchor = revealed["timestamp"].max() if len(revealed) else first_test
        next_items[str(uid)], next_window[str(uid)] = next_targets(rest, seen, anchor)
        known[str(uid)] = int(train_counts.get(uid, 0)) + len(revealed)
        if len(revealed):
            observed_parts.append(revealed)
    if max_users is not None and len(targets) > max_users:
        rng = np.random.default_rng(seed)
        keep = set(rng.choice(sorted(targets), size=max_users, replace=False).tolist())
        targets = {u: r for u, r in targets.items() if u in keep}
        next_items = {u: r for u, r in next_items.items() if u in keep}
        next_window = {u: r for u, r in next_window.items() if u in keep}
        known = {u: n for u, n in known.items() if u in keep}
        observed_parts = [p for p in observed_parts if str(p["user_id"].iloc[0]) in keep]
    observed = (
        pd.concat(observed_parts, ignore_index=True).drop(columns="_order")
        if observed_parts
        else test_ev.iloc[0:0].drop(columns="_order")
    )
    new_items = set(map(str, ds.items["item_id"])) - set(map(str, train_ev["item_id"]))
    return EvalSplit(
        train=train,
        observed=observed,
        targets=targets,
        known_events=known,
        new_items=new_items,
        cutoff=first_test,
        params={
            "kind": "global time cut-off",
            "quantile": None if cutoff else quantile,
            "cutoff": str(cutoff) if cutoff else None,
            "first_test_event": str(first_test) if first_test is not None else None,
            "train_events": len(train_ev),
            "test_events": len(test_ev),
            "fold_in": fold_in,
            "max_users": max_users,
            "seed": seed,
            "next_items": NEXT_ITEMS,
            "next_days": NEXT_DAYS,
        },
        next_items=next_items,
        next_window=next_window,
    )
