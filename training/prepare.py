"""Data preparation for every stage (pandas/numpy, no model work): runs once on the driver.

The dataset is loaded and split by time (:func:`training.data.split.time_split`) so that
validation asks "which items does the user like next", then turned into text examples
(:mod:`training.data.examples`) for the towers and the ranker, and into event sequences of
all users' training-period interactions for the sequence model
(:mod:`training.models.sequence`; its content vectors are added by the driver, which has the
encoder). Everything that samples is seeded from ``cfg.seed`` with a fixed offset per use, so
a run is reproducible and the stages draw independent samples.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from training.config import TrainConfig, resolve_path
from training.data import Dataset, load_dataset
from training.data.examples import (
    TextBuilder,
    candidate_pool,
    eval_users,
    ranker_examples,
    retrieval_examples,
    user_positive_sets,
)
from training.data.split import time_split
from training.models.sequence import SequenceEval, sequence_eval
from training.models.sequence_data import ItemSpace, build_item_space, training_rows


@dataclass(frozen=True)
class RetrievalEval:
    """Validation users (``{"user_id", "user_text", "relevant", "seen"}``) and the candidate
    items every one of them is ranked against."""

    users: list[dict[str, Any]]
    item_ids: list[str]
    item_texts: list[str]


@dataclass(frozen=True)
class PreparedData:
    """What the stages need from the dataset; ``info`` goes into ``metrics.json``."""

    dataset: Dataset
    builder: TextBuilder
    #: user_id -> positive items in the training split / in all events
    train_positives: dict[str, set[str]]
    all_positives: dict[str, set[str]]
    #: ``{"user_id", "item_id", "user_text", "item_text"}`` per positive training event
    retrieval_train: list[dict[str, str]]
    retrieval_eval: RetrievalEval
    #: positives the ranker's labelled pairs are built around (after mining)
    ranker_positives: list[dict[str, str]]
    ranker_eval_users: list[dict[str, Any]]
    info: dict[str, Any]
    #: the sequence model's catalogue (without content vectors), training sequences (every
    #: user's training events, in chunks) and validation users; empty when disabled
    sequence_space: ItemSpace | None = None
    sequence_train: list[dict[str, Any]] = field(default_factory=list)
    sequence_eval: SequenceEval | None = None
    #: the time split itself (the feature ranker replays candidates at cut-offs inside it)
    train_events: pd.DataFrame | None = None
    test_events: pd.DataFrame | None = None


def prepare_data(cfg: TrainConfig) -> PreparedData:
    """Load, split and turn the dataset into examples; prints the load report and counts."""
    t0 = time.time()
    ds = load_dataset(resolve_path(cfg.data_dir))
    print(ds.report.summary(), flush=True)
    train_ev, test_ev = time_split(
        ds.events,
        cutoff=cfg.split_cutoff,
        quantile=cfg.split_quantile,
        leave_last_n=cfg.split_leave_last_n,
    )
    builder = TextBuilder(ds.items, history_len=cfg.history_len, max_chars=cfg.max_chars)
    r, k = cfg.retrieval, cfg.ranker
    ret_train = retrieval_examples(train_ev, builder, max_examples=r.max_examples, seed=cfg.seed)
    ret_users = eval_users(
        train_ev,
        test_ev,
        builder,
        max_users=r.eval_users,
        max_relevant=r.eval_relevant_per_user,
        seed=cfg.seed,
    )
    relevant = [i for u in ret_users for i in u["relevant"]]
    pool = candidate_pool(builder.item_ids, relevant, r.eval_candidates, seed=cfg.seed)
    rk_pos = retrieval_examples(train_ev, builder, max_examples=k.max_examples, seed=cfg.seed + 1)
    rk_users = eval_users(
        train_ev, test_ev, builder, max_users=k.eval_users, max_relevant=None, seed=cfg.seed + 1
    )
    if not ret_train:
        raise ValueError("no retrieval training examples: is the training split empty?")
    seq = cfg.sequence
    space, seq_rows, seq_eval = None, [], None
    if seq.enabled:
        catalogue = [str(i) for i in ds.items["item_id"]]
        space = build_item_space(train_ev, catalogue, periods=seq.time_periods)
        seq_rows = training_rows(
            train_ev, space, max_len=seq.max_seq_len, max_rows=seq.max_examples, seed=cfg.seed + 4
        )
        seq_eval = sequence_eval(
            train_ev, test_ev, space, max_users=seq.eval_users, seed=cfg.seed + 4
        )
    info = {
        "events": len(ds.events),
        "items": len(ds.items),
        "train_events": len(train_ev),
        "test_events": len(test_ev),
        "split_train_max_ts": str(train_ev["timestamp"].max()) if len(train_ev) else None,
        "split_test_min_ts": str(test_ev["timestamp"].min()) if len(test_ev) else None,
        "retrieval_examples": len(ret_train),
        "retrieval_eval_users": len(ret_users),
        "retrieval_eval_candidates": len(pool),
        "ranker_positives": len(rk_pos),
        "ranker_eval_users": len(rk_users),
        "sequence_train_sequences": len(seq_rows),
        "sequence_eval_users": len(seq_eval.inputs) if seq_eval else 0,
        "load_report_counts": dict(ds.report.counts),
        "malformed_rows": len(ds.report.malformed),
        "prepare_seconds": round(time.time() - t0, 2),
    }
    print(f"[data] {json.dumps(info)}", flush=True)
    return PreparedData(
        dataset=ds,
        builder=builder,
        train_positives=user_positive_sets(train_ev),
        all_positives=user_positive_sets(ds.events),
        retrieval_train=ret_train,
        retrieval_eval=RetrievalEval(
            users=ret_users, item_ids=pool, item_texts=[builder.item(i) for i in pool]
        ),
        ranker_positives=rk_pos,
        ranker_eval_users=rk_users,
        info=info,
        sequence_space=space,
        sequence_train=seq_rows,
        sequence_eval=seq_eval,
        train_events=train_ev,
        test_events=test_ev,
    )


@dataclass(frozen=True)
class MiningQueries:
    """Hard-negative mining input: one query per ranker positive, then one per ranker eval
    user, each with the items it must not get back (its known positives)."""

    user_texts: list[str]
    exclude: list[set[str]]
    item_ids: list[str]
    item_texts: list[str]
    n_train: int  # the first n_train queries are the ranker positives


def mining_queries(cfg: TrainConfig, data: PreparedData) -> MiningQueries:
    """Queries over a candidate pool that always holds the eval users' relevant items, so
    their hard negatives come from the same pool the positives are in."""
    pos, users = data.ranker_positives, data.ranker_eval_users
    must = [i for u in users for i in u["relevant"]]
    pool = candidate_pool(
        data.builder.item_ids, must, cfg.ranker.mining_candidates, seed=cfg.seed + 2
    )
    excl_train = [data.train_positives.get(e["user_id"], set()) | {e["item_id"]} for e in pos]
    excl_eval = [set(u["seen"]) | set(u["relevant"]) for u in users]
    return MiningQueries(
        user_texts=[e["user_text"] for e in pos] + [u["user_text"] for u in users],
        exclude=excl_train + excl_eval,
        item_ids=pool,
        item_texts=[data.builder.item(i) for i in pool],
        n_train=len(pos),
    )


def ranker_pairs(
    cfg: TrainConfig,
    data: PreparedData,
    hard_train: dict[int, list[str]],
    hard_eval: list[list[str]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Labelled ``{"user_text", "item_text", "label", "kind"}`` pairs for training and
    evaluation, negatives drawn from the mined lists (``hard_train`` by positive index,
    ``hard_eval`` per eval user) and at random."""
    k = cfg.ranker
    train = ranker_examples(
        data.ranker_positives,
        data.builder,
        user_positives=data.train_positives,
        hard_candidates=hard_train,
        random_negatives=k.random_negatives,
        hard_negatives=k.hard_negatives,
        seed=cfg.seed,
    )
    return train, _ranker_eval_pairs(cfg, data, hard_eval)


def _ranker_eval_pairs(
    cfg: TrainConfig, data: PreparedData, hard: list[list[str]]
) -> list[dict[str, Any]]:
    """Per eval user: some next-liked items (positives), hard and random negatives never
    liked by the user at any time (so no future positive is scored as a negative)."""
    k = cfg.ranker
    builder = data.builder
    rng = random.Random(cfg.seed + 3)
    pairs: list[dict[str, Any]] = []

    def pair(u: dict[str, Any], iid: str, label: float, kind: str) -> None:
        text = builder.item(iid)
        pairs.append({"user_text": u["user_text"], "item_text": text, "label": label, "kind": kind})

    for u, hard_u in zip(data.ranker_eval_users, hard, strict=True):
        banned = set(u["seen"]) | set(u["relevant"]) | data.all_positives.get(u["user_id"], set())
        rel = u["relevant"]
        for iid in rng.sample(rel, min(k.eval_positives_per_user, len(rel))):
            pair(u, iid, 1.0, "pos")
        hard_ok = [i for i in hard_u if i not in banned]
        chosen = rng.sample(hard_ok, min(k.eval_hard_negatives, len(hard_ok)))
        for iid in chosen:
            pair(u, iid, 0.0, "hard")
        n = 0
        for _ in range(100 * max(1, k.eval_random_negatives)):
            if n >= k.eval_random_negatives:
                break
            iid = builder.item_ids[rng.randrange(len(builder.item_ids))]
            if iid in banned or iid in chosen:
                continue
            chosen.append(iid)
            n += 1
            pair(u, iid, 0.0, "random")
    return pairs
