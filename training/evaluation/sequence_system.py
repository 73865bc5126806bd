"""The sequence model (:mod:`training.models.sequence`) as an offline evaluation system, and
the validation run its defaults were chosen with.

:class:`SequenceRecommender` trains the same model, batches and loss as the Ray stage
(``training/tasks/sequence.py``), in this process and without Ray, on the evaluation split's
training events; it recommends from each user's whole known history (training events plus
the fold-in events given to :meth:`observe`), read in time order, and scores every catalogue
item including new ones (through their content vectors).

``python -m training.evaluation.sequence_system --data DIR [--set key=value ...]`` fits
the model on a *validation* split of the evaluation's training period (its own 0.9 time
quantile; the test users are never looked at) and prints NDCG@10 on the validation users'
long-horizon and next-items targets, with time-decayed popularity, ItemKNN, ALS and BPR on
the same split for reference. Several ``--config name:key=value,key=value`` compare variants.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from training.config import SequenceConfig
from training.data.schema import Dataset
from training.evaluation.systems import CatalogueRecommender
from training.models.sequence import SASRec, train_sequence_model
from training.models.sequence_data import (
    UserSequence,
    build_item_space,
    content_vectors,
    training_rows,
    user_inputs,
    user_sequences,
)
from training.sequence_choice import SequenceChoice, choose_sequence

log = logging.getLogger(__name__)


class SequenceRecommender(CatalogueRecommender):
    """SASRec over each user's interactions (see module docstring); users without any
    positive history get the popularity fallback of :class:`CatalogueRecommender`."""

    name = "sequence"

    def __init__(
        self,
        cfg: SequenceConfig | None = None,
        *,
        model_dir: str = "",
        encoder: Any = None,
        seed: int = 0,
        threads: int = 2,
    ) -> None:
        super().__init__()
        self.cfg = cfg or SequenceConfig()
        self.model_dir = model_dir
        self.encoder = encoder
        self.seed, self.threads = seed, threads
        self.model: SASRec | None = None
        self.choice: SequenceChoice | None = None  # the setting _fit chose, and why
        self.train_history: list[dict[str, float]] = []
        self._sequences: dict[str, UserSequence] | None = None

    def _fit(self, train: Dataset) -> None:
        torch.set_num_threads(max(1, self.threads))
        space = build_item_space(train.events, self.item_ids, periods=self.cfg.time_periods)
        if self.cfg.use_content:
            space = space.with_content(
                content_vectors(
                    train.items,
                    self.item_ids,
                    model_dir=self.cfg.content_model or self.model_dir,
                    max_seq_len=self.cfg.content_max_seq_len,
                    encoder=self.encoder,
                    cache=self.cfg.content_cache,
                )
            )
        content = space.content if space.content.size else None
        self.choice = choose_sequence(
            self.cfg, train.events, self.item_ids, content, seed=self.seed, log=log.info
        )
        log.info("%s", self.choice)
        cfg = self.choice.config
        rows = training_rows(
            train.events,
            space,
            max_len=cfg.max_seq_len,
            max_rows=cfg.max_examples,
            seed=self.seed,
        )
        t0 = time.perf_counter()
        self.model, self.train_history = train_sequence_model(
            cfg, space, rows, seed=self.seed, log=log.info
        )
        log.info("sequence: %d sequences, trained in %.1fs", len(rows), time.perf_counter() - t0)

    def observe(self, events: pd.DataFrame) -> None:
        super().observe(events)
        self._sequences = None  # rebuilt from the known events on the next request

    def sequences(self) -> dict[str, UserSequence]:
        """Every user's known events (training + fold-in) as model inputs."""
        if self._sequences is None:
            if self.model is None:
                return {}
            self._sequences = user_sequences(self._known, self.model.space)
        return self._sequences

    def user_vectors(self, user_ids: Sequence[str]) -> torch.Tensor:
        """``[len(user_ids), d]`` user vectors (zeros for users without events)."""
        if self.model is None:
            raise RuntimeError("fit() first")
        seqs = self.sequences()
        x = user_inputs([seqs.get(u) for u in user_ids], self.model.cfg.max_seq_len)
        return self.model.encode_user(x)

    def scores(self, user_ids: Sequence[str]) -> np.ndarray:
        if self.model is None:
            raise RuntimeError("fit() first")
        return self.model.score_users(self.user_vectors(user_ids)).numpy().astype(np.float64)


# --------------------------------------------------------------------------------------------
# choosing the defaults on a validation window of the training period


def validation_split(ds: Dataset, *, test_quantile: float = 0.8, val_quantile: float = 0.9) -> Any:
    """The evaluation's training period (``test_quantile``, as ``make eval``), split again at
    its own ``val_quantile``: the same protocol, no test event anywhere."""
    from training.evaluation.protocol import make_split

    outer = make_split(ds, quantile=test_quantile)
    inner = Dataset(outer.train.events, ds.items, ds.report)
    return make_split(inner, quantile=val_quantile)


def validate(
    ds: Dataset,
    configs: dict[str, SequenceConfig],
    *,
    baselines: bool = True,
    seed: int = 0,
    threads: int = 2,
    val_quantile: float = 0.9,
) -> dict[str, dict[str, Any]]:
    """NDCG@10 per validation slice for every config (and the reference baselines)."""
    from training.evaluation import metrics as M
    from training.evaluation.systems import ALS, BPR, ItemKNN, TrendingPopularity

    split = validation_split(ds, val_quantile=val_quantile)
    slices = split.slices()
    systems: dict[str, CatalogueRecommender] = {}
    if baselines:
        systems = {
            "popularity_trending": TrendingPopularity(),
            "itemknn": ItemKNN(neighbours=100),
            "als": ALS(seed=seed, threads=threads),
            "bpr": BPR(seed=seed, threads=1),
        }
    for name, cfg in configs.items():
        systems[name] = SequenceRecommender(cfg, seed=seed, threads=threads)
    out: dict[str, dict[str, Any]] = {}
    for name, system in systems.items():
        t0 = time.perf_counter()
        system.fit(split.train)
        system.observe(split.observed)
        recs = system.recommend(split.users, 10)
        row: dict[str, Any] = {"seconds": round(time.perf_counter() - t0, 1)}
        for sname in ("all", "next_items", "next_items_warm", "next_items_cold"):
            per_user = M.per_user_ndcg(recs, slices[sname], 10)
            row[sname] = float(np.mean(list(per_user.values()))) if per_user else 0.0
        if isinstance(system, SequenceRecommender) and system.train_history:
            row["s_per_epoch"] = round(
                float(np.mean([h["epoch_seconds"] for h in system.train_history])), 2
            )
            if system.choice is not None:
                row["chosen"] = system.choice.chosen
        out[name] = row
        print(f"{name}: {json.dumps(row)}", flush=True)
    return out


def _parse_config(spec: str) -> tuple[str, SequenceConfig]:
    """``name:key=value,key=value`` -> (name, config with those overrides)."""
    name, _, body = spec.partition(":")
    kv = {}
    for part in filter(None, body.split(",")):
        key, _, value = part.partition("=")
        kv[key.strip()] = yaml.safe_load(value)
    from training.config import _build

    base = dataclasses.asdict(SequenceConfig())
    return name, _build(SequenceConfig, {**base, **kv}, "sequence")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.evaluation.sequence_system")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--config", action="append", default=[], help="name:key=value,...")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--val-quantile", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    from training.data import load_dataset

    configs = dict(_parse_config(s) for s in args.config) or {"default": SequenceConfig()}
    validate(
        load_dataset(args.data),
        configs,
        baselines=not args.no_baselines,
        seed=args.seed,
        threads=args.threads,
        val_quantile=args.val_quantile,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
