"""The DCN-v2 feature ranker as a :class:`~training.tasks.base.Task`: binary cross-entropy on
the gateway's candidates (label: among the user's next new positives), AUC, log-loss and
NDCG@10 of its order on validation users' candidates, beside the NDCG@10 of their popularity
order and of their retrieval order (the order it re-ranks: what serves with it off).

A row is one user's candidate group (``features`` ``(c, F)``, ``labels`` ``(c,)``,
``targets``), so a batch is a few users' groups concatenated. The feature statistics for
standardisation come from the driver (plain lists), so every worker builds the same model.

Checkpoint format: ``feature_ranker/`` (see :mod:`training.models.feature_ranker`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from core import fusion
from core.behaviour import popularity_half_life
from core.config import get_settings
from core.ranking_features import FEATURES, NEW_ITEM_DAYS, RANKED_SOURCES
from training.config import FeatureRankerConfig
from training.data.candidates import (
    CandidateConfig,
    Catalogue,
    IndexState,
    SequenceAt,
    SequenceScores,
    candidate_groups,
    exposure_groups,
    split_at,
)
from training.models.feature_ranker import (
    DCNv2,
    Ranker,
    build_ranker,
    load_feature_ranker,
    save_feature_ranker,
)
from training.models.metrics import log_loss, roc_auc
from training.tasks.base import Batch, Row, Task

SUBDIR = "feature_ranker"
Groups = Sequence[Row]


def replayed_groups(
    catalogue: Catalogue,
    events: pd.DataFrame,
    later: pd.DataFrame,
    cfg: FeatureRankerConfig,
    cuts: Sequence[pd.Timestamp],
    seed: int = 0,
    sequence: SequenceAt | None = None,
    served: SequenceScores | None = None,
    half_life_days: float | None = None,
    exposures: pd.DataFrame | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The stage's data: training groups at ``cuts`` inside ``events`` (the users active
    after each, with ``sequence(cut)``: the sequence model as it would have been served
    there), and validation groups for the users of ``later`` with the catalogue as
    ``events`` leave it (with the ``served`` model).
    ``make train`` passes its training/test split, :mod:`training.evaluation.ranker_validation`
    a point inside the training period: the same replay either way. Validation groups are
    always the gateway's fused candidates (what is served); training groups are fused too
    unless ``cfg.fused`` is off. Popularity decays with ``half_life_days``, by default the
    one indexing ``events`` would (the setting, else chosen on them).

    Logged ``exposures`` (:mod:`training.data.exposures`) add training groups of the shown
    items: each response with the index of the latest cut-off before it (and that cut-off's
    sequence model); responses before the first cut-off, after the end of ``events``, or
    without a later positive inside it, add none.

    Every training group names the index of its cut-off in sorted ``cuts`` (``cutoff``);
    a logged response's group is also marked ``logged``."""
    settings = get_settings()
    weights = settings.retrieval_weights
    if half_life_days is None:
        half_life_days = popularity_half_life(events, settings.popularity_half_life_days)
    replay = CandidateConfig(
        cfg.candidates,
        cfg.history_window,
        cfg.fold_in,
        cfg.targets,
        cfg.users_per_cutoff,
        weights if cfg.fused else None,
        half_life_days,
    )
    groups: list[dict[str, Any]] = []
    ordered = sorted(cuts)
    for n, cut in enumerate(ordered):
        before, after = split_at(events, cut)
        twin = sequence(cut) if sequence is not None else None
        state = IndexState.at(catalogue, before, half_life_days)  # for both kinds of group
        made = candidate_groups(catalogue, before, after, replay, seed + n, twin, state)
        groups += [{**g, "cutoff": n} for g in made]
        if exposures is not None and len(exposures):
            at = exposures["timestamp"]
            # up to the next cut-off; the last, up to the end of ``events`` (later responses
            # have nothing after them to label with: the validation period's are not used)
            until = ordered[n + 1] if n + 1 < len(ordered) else events["timestamp"].max()
            shown = exposures[(at >= cut) & (at < until)]
            logged = exposure_groups(
                catalogue, before, events, shown, replay, seed + n, twin, state
            )
            print(f"[feature_ranker] {len(logged)} of {len(shown)} logged responses after {cut}")
            groups += [{**g, "cutoff": n, "logged": True} for g in logged]
    replay = dataclasses.replace(replay, max_users=cfg.eval_users, weights=weights)
    return groups, candidate_groups(catalogue, events, later, replay, seed + 5, served)


def collate_groups(rows: Sequence[Row]) -> Batch:
    return {
        "features": torch.from_numpy(np.concatenate([r["features"] for r in rows])),
        "labels": torch.from_numpy(np.concatenate([r["labels"] for r in rows])),
    }


def feature_scaling(groups: Groups) -> tuple[list[float], list[float]]:
    """Mean and standard deviation of every feature over the training candidates."""
    stacked = np.concatenate([g["features"] for g in groups]).astype(np.float64)
    return stacked.mean(axis=0).tolist(), stacked.std(axis=0).tolist()


def group_ndcg(
    groups: Groups, scores: Sequence[np.ndarray], k: int = 10, exploration: float = 0.0
) -> float:
    """Mean NDCG@k of ranking each group by ``scores`` (:func:`group_ndcgs`)."""
    values = group_ndcgs(groups, scores, k, exploration)
    return float(values.mean()) if len(values) else float("nan")


def group_ndcgs(
    groups: Groups, scores: Sequence[np.ndarray], k: int = 10, exploration: float = 0.0
) -> np.ndarray:
    """NDCG@k of ranking each group by ``scores``, one per group; the ideal counts every
    target of the user (also those retrieval missed), as the offline evaluation does.
    ``exploration``: the gateway's exploration slots for new items
    (:func:`core.fusion.explore`, filled in :func:`core.fusion.slot_order`) applied first."""
    discount = 1.0 / np.log2(np.arange(k) + 2)
    pop, ann = FEATURES.index("popularity"), FEATURES.index("ann_rr")
    age, known = FEATURES.index("age"), FEATURES.index("age_known")
    recent = np.log1p(NEW_ITEM_DAYS) / 10  # the age feature of a NEW_ITEM_DAYS old item
    pool = get_settings().exploration_pool
    values = []
    for g, s in zip(groups, scores, strict=True):
        order = np.argsort(-s, kind="stable")[:k]
        if exploration > 0:
            f = g["features"]
            new = (f[:, pop] == 0) & ((f[:, known] == 0) | (f[:, age] < recent))  # is_new
            content = np.where(f[:, ann] > 0, f[:, ann], -np.inf)  # the ANN's reciprocal rank
            days = np.where(f[:, known] > 0, np.expm1(10 * f[:, age]), np.inf)  # the feature
            found = fusion.slot_order(content, new, days.tolist(), pool)
            order = np.asarray(fusion.explore(order.tolist(), found, new, k, exploration))
        dcg = float((g["labels"][order] * discount[: len(order)]).sum())
        values.append(dcg / float(discount[: min(k, int(g["targets"]))].sum()))
    return np.asarray(values, dtype=np.float64)


@torch.no_grad()
def group_scores(
    model: Ranker, groups: Groups, device: torch.device | None = None
) -> list[np.ndarray]:
    """The model's logit of every candidate, one array per group (the model's mode as
    found: a caller that trained it puts it in eval mode first)."""
    return [model(torch.from_numpy(g["features"]).to(device)).float().cpu().numpy() for g in groups]


def retrieval_order(groups: Groups, weights: Mapping[str, float]) -> list[np.ndarray]:
    """Each group's candidates scored as retrieval fused them with ``weights`` (what the
    gateway serves without a ranker; :func:`core.fusion.fuse_ids`): the 1-based rank in each
    ranked source read back from its reciprocal-rank feature (0: not returned)."""
    columns = [(FEATURES.index(f"{s}_rr"), float(weights.get(s, 0.0))) for s in RANKED_SOURCES]
    out = []
    for g in groups:
        score = np.zeros(len(g["features"]))
        for column, weight in columns:
            rr = g["features"][:, column].astype(np.float64)
            found = rr > 0
            score[found] += weight * fusion.rrf(np.rint(1.0 / rr[found]))
        out.append(score)
    return out


@dataclass
class FeatureRankerTask(Task[Ranker, Groups]):
    """Click / no-click on replayed gateway candidates (see the module docstring)."""

    cfg: FeatureRankerConfig
    mean: list[float] = field(default_factory=lambda: [0.0] * len(FEATURES))
    std: list[float] = field(default_factory=lambda: [1.0] * len(FEATURES))
    served: bool = True  # whether its release serves it (training/release_choice.py)
    name: ClassVar[str] = "feature_ranker"

    def build_model(self, pretrained: str) -> Ranker:
        cfg = self.cfg
        model = build_ranker(
            cfg.members,
            lambda: DCNv2(
                len(FEATURES), cfg.cross_layers, cfg.hidden, cfg.dropout, cfg.sequence, self.served
            ),
        )
        model.set_scaling(torch.tensor(self.mean), torch.tensor(self.std))
        return model

    def load_model(self, checkpoint: Path) -> Ranker:
        return load_feature_ranker(checkpoint / SUBDIR)

    def save_model(self, model: Ranker, tokenizer: Any, checkpoint: Path) -> None:
        save_feature_ranker(model, checkpoint / SUBDIR)

    def collator(self, tokenizer: Any) -> Any:
        return collate_groups

    def start(self, rows: Sequence[Row], device: torch.device) -> str:
        candidates = sum(len(r["labels"]) for r in rows)
        positives = int(sum(r["labels"].sum() for r in rows))
        return f"{len(rows)} users, {candidates} candidates ({positives} clicked)"

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Each member's own binary cross-entropy, summed (so an ensemble's logged
        ``train_loss`` is the members' sum): the members learn independently (their gradients
        do not mix), so they stay as different as their seeds made them."""
        logits = model(batch["features"], members=True)  # through DDP's forward, if wrapped
        labels = batch["labels"].expand_as(logits)
        return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1).sum()

    @torch.no_grad()
    def evaluate(
        self, model: Ranker, tokenizer: Any, data: Groups, device: torch.device
    ) -> dict[str, float]:
        was_training = model.training
        model.eval()
        scores = group_scores(model, data, device)
        model.train(was_training)  # as found: a caller scoring afterwards gets no dropout
        labels = np.concatenate([g["labels"] for g in data])
        logits = np.concatenate(scores)
        popular = [g["features"][:, FEATURES.index("popular_rr")] for g in data]
        return {
            "auc": roc_auc(labels, logits),
            "log_loss": log_loss(labels, 1 / (1 + np.exp(-logits))),
            "ndcg_at_10": group_ndcg(data, scores),
            # what one exploration slot in ten (the gateway's default) costs
            "ndcg_at_10_explore": group_ndcg(data, scores, exploration=0.1),
            "ndcg_at_10_popularity": group_ndcg(data, popular),
            # the order it re-ranks: what the gateway serves with the ranker off
            "ndcg_at_10_retrieval": group_ndcg(
                data, retrieval_order(data, get_settings().retrieval_weights)
            ),
        }
