"""Whether a release serves the sequence model, chosen per catalogue inside the training period.

The sequence model costs every ``Recommend`` a Triton request (a candidate source and two
ranker features) and ``make train`` a replay twin per cut-off. On some catalogues the feature
ranker does as well without it (a music play log: 0.1333 against 0.1300 NDCG@10 on
``ranker_validation``'s 0.9 window), on others it lifts it (a click-only shop: +7% on both
windows; training/evaluation/FINDINGS.md). So, like popularity's half-life and the
exploration share, the catalogue decides, on its last two windows as they do: the stage's
replay is run with and without the sequence model; for each of the last two cut-offs the
ranker is trained on the groups of the cut-offs before it (in this process, for a few seeds)
and scored on that cut-off's users, who are inside the training period (the test users are
not looked at). The sequence model is served only when it is ahead by more than one
standard error of the paired per-user difference over both windows: between choices the
windows cannot tell apart, the cheaper one wins.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.config import FeatureRankerConfig
from training.loop import fit_in_process
from training.tasks.feature_ranker import (
    FeatureRankerTask,
    feature_scaling,
    group_ndcgs,
    group_scores,
)

Groups = Sequence[dict[str, Any]]


@dataclass(frozen=True)
class SequenceChoice:
    """The choice and its evidence: mean NDCG@10 over the validation users (and seeds)."""

    serve: bool
    users: int  # validation groups: a user of both windows counts twice
    with_sequence: float
    without: float
    standard_error: float  # of the mean paired difference (with - without)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        verdict = "served" if self.serve else "not served"
        return (
            f"sequence model {verdict}: ranker NDCG@10 on the last cut-offs' {self.users} users "
            f"{self.with_sequence:.4f} with it, {self.without:.4f} without "
            f"(s.e. of the difference {self.standard_error:.4f})"
        )


def cutoff_split(groups: Groups, cutoff: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the groups of the cut-offs before ``cutoff``, the users replayed at ``cutoff``): each
    group names its cut-off (:func:`training.tasks.feature_ranker.replayed_groups`). Logged
    responses after ``cutoff`` are neither: their labels lie in the validation period."""
    train = [g for g in groups if int(g["cutoff"]) < cutoff]
    held_out = [g for g in groups if int(g["cutoff"]) == cutoff and not g.get("logged")]
    return train, held_out


def validation_ndcg(
    groups: Groups, cfg: FeatureRankerConfig, seeds: Sequence[int], windows: int = 2
) -> dict[tuple[int, str], float]:
    """Each ``(cut-off, user)``'s NDCG@10 for the last ``windows`` cut-offs that have one
    before them, under rankers trained on the groups of the cut-offs before it, averaged over
    ``seeds``."""
    cutoffs = sorted({int(g["cutoff"]) for g in groups})[1:][-windows:] if windows > 0 else []
    out: dict[tuple[int, str], float] = {}
    for cutoff in cutoffs:
        train, held_out = cutoff_split(groups, cutoff)
        if not held_out:
            continue
        mean, std = feature_scaling(train)
        per_seed = []
        for seed in seeds:
            model = fit_in_process(FeatureRankerTask(cfg, mean, std), train, seed)
            per_seed.append(group_ndcgs(held_out, group_scores(model, held_out)))
        values = np.mean(per_seed, axis=0)
        out.update(
            {(cutoff, str(g["user_id"])): float(v) for g, v in zip(held_out, values, strict=True)}
        )
    return out


def choose_sequence(
    with_sequence: Groups,
    without: Groups,
    cfg: FeatureRankerConfig,
    seeds: Sequence[int] = (0, 1),
    windows: int = 2,
) -> SequenceChoice:
    """The choice from the stage's replay with the sequence model and without it (see the
    module docstring) on its last ``windows`` cut-offs; ``cfg``: the stage's settings (its
    batch the global batch). Fewer than two users in common, or a single cut-off, is no
    evidence: not served."""
    a = validation_ndcg(with_sequence, dataclasses.replace(cfg, sequence=True), seeds, windows)
    b = validation_ndcg(without, dataclasses.replace(cfg, sequence=False), seeds, windows)
    users = sorted(a.keys() & b.keys())
    if len(users) < 2:
        nan = float("nan")
        return SequenceChoice(False, len(users), nan, nan, nan)
    x = np.array([a[u] for u in users])
    y = np.array([b[u] for u in users])
    diff = x - y
    se = float(diff.std(ddof=1) / np.sqrt(len(diff)))
    return SequenceChoice(bool(diff.mean() > se), len(users), float(x.mean()), float(y.mean()), se)
