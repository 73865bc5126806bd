"""Replay harness: held-out interactions become simulated A/B traffic.

For each held-out user (sorted, so runs are reproducible) the harness assigns arms exactly
as the gateway does (:func:`~services.experiments.assignment.assign_all`), asks
``recommend(user_id, variant, k)`` for the list the user's arm would serve, logs the
exposure and logs a click for every exposed item that is among the user's held-out positives
(each kept with probability ``click_prob``, seeded). The log then goes through the same
report as live traffic, so assignment -> exposure -> feedback -> report is exercised end to
end without a gateway. ``recommend`` can wrap an offline system or a gateway client.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from services.experiments.assignment import Experiment, assign_all, merged_variant
from services.experiments.exposures import ExposureLog

RecommendFn = Callable[[str, dict[str, Any], int], Sequence[str]]


def replay(
    heldout: Mapping[str, Collection[str]],
    experiments: Sequence[Experiment],
    recommend: RecommendFn,
    log: ExposureLog,
    *,
    k: int = 10,
    start_ts: float = 1_700_000_000.0,
    step_s: float = 60.0,
    click_delay_s: float = 5.0,
    click_prob: float = 1.0,
    seed: int = 0,
) -> dict[str, dict[str, int]]:
    """Simulate one request per held-out user; returns ``"exp=arm" -> {users, clicks}``."""
    rng = random.Random(seed)
    stats: dict[str, dict[str, int]] = defaultdict(lambda: {"users": 0, "clicks": 0})
    ts = start_ts
    for user in sorted(heldout):
        assignments = assign_all(experiments, user)
        if not assignments:
            continue
        items = [str(i) for i in recommend(user, merged_variant(assignments), k)][:k]
        log.record_exposures(user, assignments, items, ts=ts)
        relevant = heldout[user]
        clicked = [i for i in items if i in relevant and rng.random() < click_prob]
        if clicked:
            log.record_feedback(user, assignments, clicked, ts=ts + click_delay_s)
        for a in assignments:
            s = stats[a.label()]
            s["users"] += 1
            s["clicks"] += len(clicked)
        ts += step_s
    return dict(stats)


def heldout_from_events(
    events: Any, *, quantile: float = 0.8, min_weight: float = 0.0
) -> dict[str, set[str]]:
    """``user -> positive items after the global time cut-off`` (``weight > min_weight``)
    from a :class:`training.data.schema.Dataset` events frame."""
    from training.data.split import time_split

    _train, test = time_split(events, quantile=quantile)
    pos = test[test["weight"] > min_weight]
    return {str(u): set(map(str, g)) for u, g in pos.groupby("user_id")["item_id"]}
