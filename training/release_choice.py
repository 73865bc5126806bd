"""What a release serves, chosen per catalogue inside the training period.

Each optional model costs every ``Recommend`` a Triton request: the feature ranker a batched
DCN-v2 pass over the candidates, the sequence model a transformer pass over the history (a
candidate source and two ranker features; BENCHMARKS.md: a third of the throughput at
concurrency 1). Some catalogues earn it and some do not: the sequence model lifts the shop's
ranker by 7% and the music log's by nothing, and MovieLens's ranker was level with the
retrieval order it re-ranks (training/evaluation/FINDINGS.md). So, like popularity's
half-life and the exploration share, the catalogue decides, on the users of its last
cut-offs inside the training period (``feature_ranker.choice_windows``, four: with two, the
shop's choice sat on the one-standard-error line; FINDINGS.md). The test users are not
looked at.

Up to four releases are compared on the same users: the retrieval order (what the gateway
serves without a ranker) and the feature ranker, each without and with the sequence model.
A ranker's figure at a cut-off is that of rankers trained on the groups of the cut-offs
before it (in this process, for a few seeds). The release served is the cheapest whose
paired per-user difference to the best is within one standard error (the one-standard-error
rule, :func:`core.behaviour.within_one_se`, as popularity's half-life and the exploration
share choose): between releases the windows cannot tell apart, the cheaper wins.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.behaviour import within_one_se
from training.config import FeatureRankerConfig
from training.steps import fit_in_process
from training.tasks.feature_ranker import (
    FeatureRankerTask,
    feature_scaling,
    group_ndcgs,
    group_scores,
    retrieval_order,
)

Groups = Sequence[dict[str, Any]]
Scores = dict[tuple[int, str], float]  # NDCG@10 of each (cut-off, user)


@dataclass(frozen=True)
class Release:
    """One way to serve: re-ranked by the feature ranker or not, with the sequence model or
    not."""

    ranker: bool
    sequence: bool

    @property
    def name(self) -> str:
        base = "feature ranker" if self.ranker else "retrieval order"
        return f"{base} + sequence model" if self.sequence else base


#: Cheapest first. The two one-request releases are ordered by the request's work: the
#: ranker's small MLP over a hundred rows against the sequence model's transformer over the
#: history. Measured (``make bench-releases``, BENCHMARKS.md): 88.6, 67.1, 59.5 and 51.1
#: QPS at concurrency 1 on MovieLens's release, in this order at 16 too.
RELEASES = (
    Release(ranker=False, sequence=False),
    Release(ranker=True, sequence=False),
    Release(ranker=False, sequence=True),
    Release(ranker=True, sequence=True),
)


@dataclass(frozen=True)
class ReleaseChoice:
    """The choice and its evidence over the validation users (and seeds)."""

    ranker: bool
    sequence: bool
    users: int  # validation groups: a user of several windows counts once in each
    ndcg: dict[str, float]  # each compared release's mean NDCG@10
    best: str  # the release with the highest mean (empty without evidence)
    #: each release's standard error of its mean paired difference to the best
    standard_error: dict[str, float]
    #: the windows read: indices of the stage's sorted cut-offs that have validation users
    cutoffs: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return Release(self.ranker, self.sequence).name

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "serves": self.name}

    def __str__(self) -> str:
        if not self.ndcg:
            return f"serves the {self.name}: {self.users} validation users, too few to compare"
        figures = ", ".join(
            f"{name} {v:.4f}"
            if name == self.best
            else f"{name} {v:.4f} (s.e. {self.standard_error[name]:.4f})"
            for name, v in self.ndcg.items()
        )
        return (
            f"serves the {self.name}: NDCG@10 on the last {len(self.cutoffs)} cut-offs' "
            f"{self.users} users {figures}; the cheapest within one s.e. of the best "
            f"({self.best})"
        )


def cutoff_split(groups: Groups, cutoff: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the groups of the cut-offs before ``cutoff``, the users replayed at ``cutoff``): each
    group names its cut-off (:func:`training.tasks.feature_ranker.replayed_groups`). Logged
    responses after ``cutoff`` are neither: their labels lie in the validation period."""
    train = [g for g in groups if int(g["cutoff"]) < cutoff]
    held_out = [g for g in groups if int(g["cutoff"]) == cutoff and not g.get("logged")]
    return train, held_out


def validation_cutoffs(groups: Groups, windows: int) -> list[int]:
    """The last ``windows`` cut-offs that have one before them to train on."""
    return sorted({int(g["cutoff"]) for g in groups})[1:][-windows:] if windows > 0 else []


def validation_ndcg(groups: Groups, cfg: FeatureRankerConfig, seeds: Sequence[int]) -> Scores:
    """Each ``(cut-off, user)``'s NDCG@10 for the last ``cfg.choice_windows`` cut-offs that
    have one before them, under rankers trained on the groups of the cut-offs before it,
    averaged over ``seeds``."""
    out: Scores = {}
    for cutoff in validation_cutoffs(groups, cfg.choice_windows):
        train, held_out = cutoff_split(groups, cutoff)
        if not held_out:
            continue
        mean, std = feature_scaling(train)
        per_seed = []
        for seed in seeds:
            model = fit_in_process(FeatureRankerTask(cfg, mean, std), train, seed)
            per_seed.append(group_ndcgs(held_out, group_scores(model, held_out)))
        out.update(_by_user(held_out, np.mean(per_seed, axis=0)))
    return out


def retrieval_ndcg(groups: Groups, weights: Mapping[str, float], windows: int) -> Scores:
    """Each ``(cut-off, user)``'s NDCG@10 of the retrieval order (``weights``: the gateway's
    fusion weights) on the same users as :func:`validation_ndcg`."""
    out: Scores = {}
    for cutoff in validation_cutoffs(groups, windows):
        _, held_out = cutoff_split(groups, cutoff)
        out.update(_by_user(held_out, group_ndcgs(held_out, retrieval_order(held_out, weights))))
    return out


def _by_user(held_out: Groups, values: np.ndarray) -> Scores:
    return {
        (int(g["cutoff"]), str(g["user_id"])): float(v)
        for g, v in zip(held_out, values, strict=True)
    }


def choose_release(
    with_sequence: Groups | None,
    without: Groups,
    cfg: FeatureRankerConfig,
    weights: Mapping[str, float],
    seeds: Sequence[int] = (0, 1),
) -> ReleaseChoice:
    """The choice (see the module docstring) from the stage's replay without the sequence
    model and, where it may be served, with it (``None``: it may not); ``cfg``: the stage's
    settings (its batch the global batch; ``choice_windows``: how many of the last cut-offs
    validate); ``weights``: the gateway's retrieval fusion weights. Fewer than two users in
    common, or a single cut-off, is no evidence: the cheapest release."""
    windows = cfg.choice_windows
    replays = {False: without, True: with_sequence}
    scores: dict[Release, Scores] = {}
    for release in RELEASES:
        groups = replays[release.sequence]
        if groups is None:
            continue
        if release.ranker:
            ranker_cfg = dataclasses.replace(cfg, sequence=release.sequence)
            scores[release] = validation_ndcg(groups, ranker_cfg, seeds)
        else:
            scores[release] = retrieval_ndcg(groups, weights, windows)
    users = sorted(set.intersection(*(set(s) for s in scores.values())))
    if len(users) < 2:
        return ReleaseChoice(False, False, len(users), {}, "", {}, _cutoffs(users))
    releases = list(scores)  # cheapest first
    gains = np.array([[scores[r][u] for r in releases] for u in users])
    best, errors, close = within_one_se(gains)
    chosen = releases[int(np.argmax(close))]  # the first close one: the best itself is
    return ReleaseChoice(
        chosen.ranker,
        chosen.sequence,
        len(users),
        {r.name: float(v) for r, v in zip(releases, gains.mean(axis=0), strict=True)},
        releases[best].name,
        {r.name: float(e) for r, e in zip(releases, errors, strict=True)},
        _cutoffs(users),
    )


def _cutoffs(users: Sequence[tuple[int, str]]) -> tuple[int, ...]:
    """The windows that ``(cut-off, user)`` keys name, in order."""
    return tuple(sorted({cutoff for cutoff, _ in users}))
