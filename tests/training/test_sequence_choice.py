"""Early stopping of the sequence model and the choice of its setting on a validation cut-off
inside the training period (:mod:`training.sequence_choice`)."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from tests.training.models.test_sequence import _cfg, _cycle_events, _events, _space
from training import sequence_choice
from training.config import CONTENT_ONLY, SequenceConfig
from training.models.sequence import SASRec, train_sequence_model
from training.models.sequence_data import training_rows
from training.sequence_choice import ALTERNATIVE, CONFIGURED, choose_sequence

ITEMS = [f"i{n}" for n in range(30)]


def _weights(model: SASRec) -> list[torch.Tensor]:
    return [v.detach().clone() for _, v in sorted(model.state_dict().items())]


def test_early_stopping_returns_the_best_epochs_weights_as_a_run_stopped_there() -> None:
    """Scored every epoch, patience 2: the scores 0.1, 0.5, 0.3, 0.2 stop it after epoch 4
    and return epoch 2's weights, which equal those of a run without scoring stopped at
    epoch 2 of the same 12-epoch schedule (scoring draws no random numbers)."""
    ev = _cycle_events(items=30)
    space = _space(ev, ITEMS, content_dim=4)
    rows = training_rows(ev, space, max_len=10)
    cfg = _cfg(epochs=12, early_stop_every=1, early_stop_patience=2, dropout=0.2)
    scores = iter([0.1, 0.5, 0.3, 0.2, 0.9, 0.9])
    model, history = train_sequence_model(
        cfg, space, rows, seed=0, validation=lambda m: next(scores)
    )
    assert [h.get("val_score") for h in history] == [0.1, 0.5, 0.3, 0.2]  # stopped there
    assert not model.training

    def stopped_at(epoch: int) -> list[torch.Tensor]:
        return _weights(train_sequence_model(replace(cfg, stop_epoch=epoch), space, rows)[0])

    assert all(torch.equal(a, b) for a, b in zip(_weights(model), stopped_at(2), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(_weights(model), stopped_at(3), strict=True))


def test_stop_epoch_cuts_the_run_but_not_its_schedule() -> None:
    cfg = SequenceConfig(epochs=10, stop_epoch=4)
    assert cfg.run_epochs == 4 and SequenceConfig(epochs=3, stop_epoch=7).run_epochs == 3
    ev = _cycle_events(items=30)
    space = _space(ev, ITEMS)
    rows = training_rows(ev, space, max_len=10)
    _, history = train_sequence_model(_cfg(epochs=10, stop_epoch=4), space, rows)
    assert len(history) == 4


def test_alternative_is_validated_when_the_config_is_read() -> None:
    alt = SequenceConfig().alternative_config()
    assert alt.id_dropout == CONTENT_ONLY["id_dropout"] and alt.epochs == CONTENT_ONLY["epochs"]
    assert alt.alternative == {}  # the alternative chooses nothing itself
    with pytest.raises(ValueError, match="unknown config key"):
        SequenceConfig(alternative={"epoch": 3})
    with pytest.raises(ValueError, match="cannot read"):
        SequenceConfig(alternative={"lr": "fast"})


def _split_events(users: int = 60, length: int = 14, items: int = 30) -> Any:
    """The item cycle of :func:`_cycle_events`, every user walking it throughout the period
    (so users active after the cut-off have a history before it)."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(users):
        start = int(rng.integers(items))
        rows += [(f"u{u}", f"i{(start + t) % items}", t * 1000 + u, 1.0) for t in range(length)]
    return _events(rows)


def test_no_alternative_or_too_few_users_keeps_the_configured_setting_without_a_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_training(*args: Any, **kw: Any) -> Any:
        raise AssertionError("nothing should be trained")

    monkeypatch.setattr(sequence_choice, "train_sequence_model", no_training)
    ev = _split_events()
    choice = choose_sequence(_cfg(alternative={}), ev, ITEMS, None)
    assert choice.chosen == CONFIGURED and choice.ndcg == {} and choice.config.stop_epoch is None
    few = choose_sequence(_cfg(choice_min_users=1000), ev, ITEMS, None)  # 60 users at most
    assert few.chosen == CONFIGURED and few.ndcg == {} and 2 <= few.users < 1000
    assert few.config.alternative == {} and few.config.id_dropout == _cfg().id_dropout
    assert "too few" in str(few) and "no alternative" in str(choice)


def test_a_real_choice_between_the_configured_setting_and_an_early_stopped_one() -> None:
    """Both candidates trained on the events before the cut-off and scored on the users
    active after it; the chosen one carries its best epoch, and nothing of the choice is
    left for the final run to choose again."""
    ev = _split_events()
    space = _space(ev, ITEMS, content_dim=4)
    alternative = {"id_dropout": 1.0, "epochs": 4, "early_stop_every": 2}
    cfg = _cfg(epochs=2, alternative=alternative, choice_min_users=2)
    choice = choose_sequence(cfg, ev, ITEMS, space.content, seed=0)
    assert set(choice.ndcg) == {CONFIGURED, ALTERNATIVE} and choice.users >= 2
    assert [e for e, _ in choice.curves[ALTERNATIVE]] == [2, 4]
    assert choice.config.alternative == {}
    if choice.chosen == ALTERNATIVE:
        assert choice.config.id_dropout == 1.0 and choice.config.stop_epoch in (2, 4)
    else:
        assert choice.config.epochs == 2 and choice.config.stop_epoch is None
    again = choose_sequence(cfg, ev, ITEMS, space.content, seed=0)
    assert again.as_dict() | {"seconds": 0} == choice.as_dict() | {"seconds": 0}  # reproducible


@pytest.mark.parametrize(
    ("alternative_gain", "chosen"), [(0.30, ALTERNATIVE), (0.002, CONFIGURED), (-0.2, CONFIGURED)]
)
def test_the_alternative_must_win_by_more_than_one_standard_error(
    monkeypatch: pytest.MonkeyPatch, alternative_gain: float, chosen: str
) -> None:
    """The per-user scores faked: a clear gain chooses the alternative (at its best epoch),
    one inside the paired standard error or a loss keeps the configured setting."""
    ev = _split_events()
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.6, size=200)
    noise = rng.normal(0, 0.05, size=200)
    calls = itertools.count()

    def fake_ndcg(model: SASRec, data: Any, k: int = 10) -> np.ndarray:
        n = len(data.inputs)
        if model.cfg.id_dropout == 1.0:
            return base[:n] + alternative_gain + noise[:n]
        return base[:n]

    def fake_train(cfg: SequenceConfig, space: Any, rows: Any, **kw: Any) -> Any:
        next(calls)
        model = SASRec(cfg, space)
        history = [{"epoch": float(e)} for e in range(cfg.run_epochs)]
        if kw.get("validation"):
            for e, h in enumerate(history):
                if (e + 1) % cfg.early_stop_every == 0:
                    h["val_score"] = [0.1, 0.4, 0.2][e // cfg.early_stop_every]
        return model, history

    monkeypatch.setattr(sequence_choice, "sequence_ndcg", fake_ndcg)
    monkeypatch.setattr(sequence_choice, "train_sequence_model", fake_train)
    alternative = {"id_dropout": 1.0, "epochs": 6, "early_stop_every": 2}
    cfg = _cfg(epochs=2, alternative=alternative, choice_min_users=2)
    choice = choose_sequence(cfg, ev, ITEMS, None)
    assert next(calls) == 2  # both candidates trained
    assert choice.chosen == chosen
    if chosen == ALTERNATIVE:
        assert choice.config.stop_epoch == 4 and choice.config.epochs == 6
        assert choice.ndcg[ALTERNATIVE] > choice.ndcg[CONFIGURED] + choice.se
    else:
        assert choice.config.epochs == 2 and choice.config.id_dropout == cfg.id_dropout
    assert "sequence setting: " + chosen in str(choice)
