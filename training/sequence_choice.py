"""Which sequence-model setting a catalogue trains, chosen on a validation cut-off inside its
training period.

No one setting serves every catalogue (FINDINGS.md, "The sequence model on thin
catalogues"): on MovieLens, where a film is watched by many users, the id embeddings carry
the model and longer or lighter training overfits it from the third epoch on; on a music
play log, whose tracks have about five listeners each, the ids overfit instead, and the
model reads the history only when every item goes through its content vector and it trains
ten times longer. So, as ``make train`` chooses popularity's half-life and what a release
serves, the catalogue decides: both settings (the configured one and its
``alternative``) are trained on the events before the cut-off (``choice_quantile`` of the
training period's events) and scored on the next items of the users active after it
(NDCG@10 of their next 10 unseen positives); a setting with ``early_stop_every`` is
early-stopped there and remembers its best epoch (``stop_epoch``), which the final run
stops at on the same schedule. The alternative wins only if it beats the configured setting
by more than one standard error of the paired per-user difference
(:func:`core.behaviour.within_one_se`), and only where at least ``choice_min_users`` users
can be scored (popularity's half-life and the exploration share also keep their defaults
below a count of users). Nothing after the training period is read.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from core.behaviour import within_one_se
from training.config import SequenceConfig
from training.data.candidates import split_at, training_cutoffs
from training.models.sequence import SASRec, sequence_eval, sequence_ndcg, train_sequence_model
from training.models.sequence_data import build_item_space, training_rows

CONFIGURED, ALTERNATIVE = "configured", "alternative"


@dataclass(frozen=True)
class SequenceChoice:
    """The setting to train (``config``: without a choice of its own, ``stop_epoch`` set
    where early stopping chose it) and the evidence: each candidate's validation NDCG@10,
    the paired standard error, its scored epochs."""

    config: SequenceConfig
    chosen: str
    ndcg: dict[str, float] = field(default_factory=dict)
    se: float = 0.0
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    users: int = 0
    cutoff: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen,
            "ndcg_at_10": {k: round(v, 4) for k, v in self.ndcg.items()},
            "paired_se": round(self.se, 4),
            "curves": {k: [[e, round(s, 4)] for e, s in c] for k, c in self.curves.items()},
            "stop_epoch": self.config.stop_epoch,
            "epochs": self.config.epochs,
            "users": self.users,
            "cutoff": self.cutoff,
            "seconds": round(self.seconds, 1),
        }

    def __str__(self) -> str:
        if not self.ndcg:
            why = f"{self.users} users to score after {self.cutoff}, too few" if self.cutoff else ""
            return f"sequence setting: {self.chosen} (not chosen on: {why or 'no alternative'})"
        scores = ", ".join(f"{k} {v:.4f}" for k, v in self.ndcg.items())
        stop = f", stopped at epoch {self.config.stop_epoch}" if self.config.stop_epoch else ""
        return (
            f"sequence setting: {self.chosen}{stop} (next-items NDCG@10 on {self.users} users "
            f"after {self.cutoff}: {scores}; paired s.e. {self.se:.4f}; {self.seconds:.0f}s)"
        )


def choose_sequence(
    cfg: SequenceConfig,
    events: pd.DataFrame,
    item_ids: Sequence[str],
    content: np.ndarray | None,
    *,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> SequenceChoice:
    """The setting to train on ``events`` (the training period) over ``item_ids`` (with
    their ``content`` vectors, row-aligned; see the module docstring). Without an
    ``alternative``, or with fewer than ``choice_min_users`` users to score after the
    cut-off, the configured setting as is, and nothing trained."""
    plain = dataclasses.replace(cfg, alternative={})
    if not cfg.alternative:
        return SequenceChoice(plain, CONFIGURED)
    t0 = time.time()
    (cut,) = training_cutoffs(events, [cfg.choice_quantile])  # as the feature ranker's
    before, after = split_at(events, cut)
    space = build_item_space(before, item_ids, periods=cfg.time_periods, content=content)
    data = sequence_eval(before, after, space, max_users=cfg.eval_users, seed=seed)
    if len(data.inputs) < max(2, cfg.choice_min_users):  # too few to tell the two apart
        return SequenceChoice(plain, CONFIGURED, cutoff=str(cut), users=len(data.inputs))
    rows = training_rows(
        before, space, max_len=cfg.max_seq_len, max_rows=cfg.max_examples, seed=seed
    )
    candidates = {CONFIGURED: plain, ALTERNATIVE: cfg.alternative_config()}
    per_user: dict[str, np.ndarray] = {}
    curves: dict[str, list[tuple[int, float]]] = {}
    trained: dict[str, SequenceConfig] = {}

    def score(model: SASRec) -> float:
        return float(sequence_ndcg(model, data).mean())

    for name, candidate in candidates.items():
        t1 = time.time()
        model, history = train_sequence_model(
            candidate,
            space,
            rows,
            seed=seed,
            validation=score if candidate.early_stop_every else None,
        )
        per_user[name] = sequence_ndcg(model, data)
        curves[name] = [(int(h["epoch"]) + 1, h["val_score"]) for h in history if "val_score" in h]
        stop = max(curves[name], key=lambda c: c[1])[0] if curves[name] else None
        trained[name] = dataclasses.replace(candidate, stop_epoch=stop)
        if log is not None:
            log(
                f"[sequence] choice: {name} NDCG@10 {per_user[name].mean():.4f}"
                + (f" at epoch {stop} of {len(history)} run" if stop else "")
                + f" in {time.time() - t1:.0f}s"
            )
    gains = np.stack([per_user[CONFIGURED], per_user[ALTERNATIVE]], axis=1)
    best, se, close = within_one_se(gains)
    chosen = CONFIGURED if close[0] else ALTERNATIVE
    return SequenceChoice(
        trained[chosen],
        chosen,
        {k: float(v.mean()) for k, v in per_user.items()},
        float(se[1 - best]),
        curves,
        len(data.inputs),
        str(cut),
        time.time() - t0,
    )
