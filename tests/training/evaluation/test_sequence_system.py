"""The sequence model as an offline evaluation system, on the small synthetic dataset."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from training.config import SequenceConfig
from training.data import load_dataset
from training.evaluation.protocol import make_split
from training.evaluation.sequence_system import SequenceRecommender, validation_split
from training.evaluation.systems import Popularity


class FakeEncoder:
    """Stands in for MiniLM: a fixed random unit vector per text."""

    def encode(self, texts: Sequence[str], *, cache: bool = True) -> np.ndarray:
        out = np.stack(
            [np.random.default_rng(zlib.crc32(t.encode())).normal(size=8) for t in texts]
        ).astype(np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def _system(**kw: Any) -> SequenceRecommender:
    base: dict[str, Any] = dict(
        dim=16, blocks=1, epochs=2, batch_size=16, max_seq_len=20, time_periods=8, alternative={}
    )
    cfg = SequenceConfig(**{**base, **kw})
    return SequenceRecommender(cfg, encoder=FakeEncoder(), threads=1)


def test_fit_recommend_excludes_seen_and_cold_users_get_popularity(generic_dir: Path) -> None:
    ds = load_dataset(generic_dir)
    split = make_split(ds, quantile=0.8, fold_in=3)
    system = _system()
    system.fit(split.train)
    system.observe(split.observed)
    assert system.model is not None and len(system.train_history) == 2
    assert system.model.content_proj is not None  # the content path is in use
    users = split.users
    recs = system.recommend([*users, "nobody"], 10)
    assert all(len(recs[u]) == 10 for u in users)
    known = pd.concat([split.train.events, split.observed])
    for u in users:
        seen = set(known.loc[known["user_id"] == u, "item_id"])
        assert not seen & set(recs[u]), u
    pop = Popularity()
    pop.fit(split.train)
    assert recs["nobody"] == pop.recommend(["nobody"], 10)["nobody"]
    # new items (no training event) get finite scores through their content vectors
    scores = system.scores(users[:3])
    new = [system.index[i] for i in split.new_items if i in system.index]
    assert new and np.isfinite(scores[:, new]).all()


def test_fold_in_events_change_the_user_vector(generic_dir: Path) -> None:
    ds = load_dataset(generic_dir)
    split = make_split(ds, quantile=0.8, fold_in=3)
    system = _system(use_content=False)
    system.fit(split.train)
    user = str(split.observed["user_id"].iloc[0])
    before = system.user_vectors([user]).clone()
    system.observe(split.observed)
    after = system.user_vectors([user])
    assert not np.allclose(before.numpy(), after.numpy())


def test_validation_split_never_reaches_the_test_period(generic_dir: Path) -> None:
    ds = load_dataset(generic_dir)
    outer = make_split(ds, quantile=0.8)
    inner = validation_split(ds)
    assert inner.train.events["timestamp"].max() < outer.train.events["timestamp"].max()
    assert inner.observed["timestamp"].max() <= outer.train.events["timestamp"].max()


def test_content_model_in_the_config_chooses_the_encoder(
    generic_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--config name:content_model=DIR`` compares content encoders on validation windows."""
    from training.evaluation import sequence_system

    seen: list[str] = []

    def fake_vectors(items: pd.DataFrame, item_ids: Sequence[str], **kw: object) -> np.ndarray:
        seen.append(str(kw["model_dir"]))
        return FakeEncoder().encode([str(i) for i in item_ids])

    monkeypatch.setattr(sequence_system, "content_vectors", fake_vectors)
    split = make_split(load_dataset(generic_dir), quantile=0.8)
    _system(content_model="runs/x/item_tower").fit(split.train)
    cfg = SequenceConfig(epochs=1, dim=16, blocks=1, alternative={})
    SequenceRecommender(cfg, model_dir="mini").fit(split.train)
    assert seen == ["runs/x/item_tower", "mini"]


def test_the_evaluated_model_is_the_setting_its_choice_chose(generic_dir: Path) -> None:
    """``make eval``'s sequence model chooses its setting as ``make train``'s stage does, on
    a cut-off of the evaluation's training period, and trains that one. This small log's
    users follow one another in time: after the cut-off too few of them have a history
    before it to score, so it keeps the configured setting and says so."""
    split = make_split(load_dataset(generic_dir), quantile=0.8)
    system = _system(alternative={"id_dropout": 1.0, "epochs": 3, "early_stop_every": 1})
    system.fit(split.train)
    assert system.choice is not None and system.model is not None
    assert system.choice.chosen == "configured" and system.choice.users < 2
    assert system.choice.ndcg == {} and "sequence setting: configured" in str(system.choice)
    assert system.model.cfg == system.choice.config and system.model.cfg.alternative == {}
    assert len(system.train_history) == system.choice.config.run_epochs == 2
    assert system.choice.cutoff < str(split.train.events["timestamp"].max())
