"""Replay harness: held-out interactions become simulated A/B traffic.

For each held-out user (sorted, so runs are reproducible) the harness assigns arms exactly
as the gateway does (:func:`~services.experiments.assignment.assign_all`), asks
``recommend(user_id, variant, k)`` for the list the user's arm would serve, logs the
exposure and logs a click for every exposed item that is among the user's held-out positives
(each kept with probability ``click_prob``, seeded). The log then goes through the same
report as live traffic, so assignment -> exposure -> feedback -> report is exercised end to
end without a gateway. ``recommend`` can wrap an offline system or a gateway client.

Experiments are written for the gateway: a ``retrieval_mix`` names the gateway's sources
(:data:`core.config.RETRIEVAL_SOURCES`), and the offline arms map each to the offline system
closest to it (:data:`OFFLINE_SOURCES`), so one configuration runs in both places.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from services.experiments.assignment import Experiment, Variant, assign_all, merged_variant
from services.experiments.exposures import ExposureLog, read_log

RecommendFn = Callable[[str, Variant, int], Sequence[str]]

#: Gateway source -> the offline system (``training.evaluation.systems``) standing in for it.
#: The gateway's defaults were carried over from the offline tuning along the same lines
#: (``core.config.Settings.retrieval_weights``):
#:
#: * ``ann`` - Milvus ANN with the mean vector of the recent history: ``content_pretrained``
#:   (cosine to the mean of the user's recent item vectors from the pretrained tower; the
#:   fine-tuned tower the gateway serves needs a checkpoint). Loaded only with ``content``.
#: * ``co_occurrence`` - neighbours of history items by cosine over users: ``itemknn``.
#: * ``segment`` - what users near this user in vector space liked, a collaborative signal:
#:   ``bpr``, the collaborative source the offline tuning weights like ``segment`` (0.5).
#: * ``popular`` - time-decayed global popularity: ``popularity_trending``.
#: * ``sequence`` - the sequence model: ``sequence`` (``make eval``'s SASRec system; not loaded
#:   by the replay, whose arms that weigh it are refused by name).
OFFLINE_SOURCES = {
    "ann": "content_pretrained",
    "co_occurrence": "itemknn",
    "segment": "bpr",
    "popular": "popularity_trending",
    "sequence": "sequence",
}


def offline_mix(mix: Mapping[str, float], loaded: Collection[str]) -> dict[str, float]:
    """A gateway ``retrieval_mix`` as fusion weights of offline systems; a source with no
    offline counterpart, or whose counterpart is not ``loaded``, is an error naming it."""
    out: dict[str, float] = {}
    for source, weight in mix.items():
        system = OFFLINE_SOURCES.get(source)
        if system is None:
            raise ValueError(
                f"retrieval_mix source {source!r} has no offline counterpart; "
                f"mapped: {sorted(OFFLINE_SOURCES)}"
            )
        if system not in loaded:
            raise ValueError(
                f"retrieval_mix source {source!r} replays as {system!r}, which is not loaded"
                + (" (pass --content)" if system == "content_pretrained" else "")
            )
        out[system] = float(weight)
    return out


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


# --------------------------------------------------------------------------------------------
# offline arms: the reference pipeline of training.evaluation with the variant's knobs

DEMO_EXPERIMENTS = [
    {
        "name": "retrieval_mix",
        "salt": "replay-demo",
        "arms": [
            {"name": "control", "weight": 50, "variant": {"retrieval_mix": {"popular": 1}}},
            {
                "name": "treatment",
                "weight": 50,
                "variant": {
                    "retrieval_mix": {"popular": 2, "co_occurrence": 1, "segment": 1},
                    "mmr_lambda": 0.1,
                },
            },
        ],
    }
]


def offline_arms(
    data_dir: str | Path,
    *,
    quantile: float = 0.8,
    fold_in: int = 3,
    max_users: int | None = None,
    seed: int = 0,
    content: bool = False,
) -> tuple[dict[str, set[str]], RecommendFn]:
    """Held-out targets of the evaluation protocol and a ``recommend(user, variant, k)``
    served by :class:`training.evaluation.pipeline.HybridPipeline`: ``retrieval_mix`` names
    gateway sources, replayed by the offline systems of :data:`OFFLINE_SOURCES` (``ann``
    needs ``content``), ``mmr_lambda`` its MMR (needs ``content``); ``model_version`` has no
    offline meaning and is ignored. Unset knobs: equal weights over every loaded system
    (popularity, popularity_trending, itemknn, als, bpr and, with ``content``,
    content_pretrained), no MMR."""
    from training.data import load_dataset
    from training.evaluation import systems as S
    from training.evaluation.pipeline import HybridPipeline, PipelineConfig
    from training.evaluation.protocol import make_split

    ds = load_dataset(data_dir)
    split = make_split(ds, quantile=quantile, fold_in=fold_in, max_users=max_users, seed=seed)
    sources: dict[str, S.CatalogueRecommender] = {
        "popularity": S.Popularity(),
        "popularity_trending": S.TrendingPopularity(),
        "itemknn": S.ItemKNN(),
        "als": S.ALS(seed=seed),
        "bpr": S.BPR(seed=seed, threads=1),  # multi-threaded BPR is not reproducible
    }
    vectors = None
    if content:
        vectors = S.PretrainedContent()
        sources["content_pretrained"] = vectors
    for src in sources.values():
        src.fit(split.train)
        src.observe(split.observed)
    pipes: dict[str, HybridPipeline] = {}

    def recommend(user_id: str, variant: Variant, k: int) -> list[str]:
        key = json.dumps(variant.set_fields(), sort_keys=True)
        if key not in pipes:
            mix = variant.retrieval_mix
            weights = offline_mix(mix, sources) if mix else dict.fromkeys(sources, 1.0)
            cfg = PipelineConfig(weights=weights, mmr_lambda=float(variant.mmr_lambda or 0.0))
            pipe = HybridPipeline(sources, cfg, mmr_source=vectors)
            pipe.fit(split.train)
            pipe.observe(split.observed)
            pipes[key] = pipe
        return pipes[key].recommend([user_id], k)[user_id]

    return split.targets, recommend


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from core.config import get_settings
    from services.experiments.assignment import load_experiments, parse_experiments
    from services.experiments.report import format_table, summarise

    ap = argparse.ArgumentParser(
        prog="python -m ops.ab_replay",
        description="Simulate A/B traffic from held-out interactions, then print the report.",
    )
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--log", required=True, type=Path, help="exposure log to (re)write")
    ap.add_argument(
        "--experiments",
        help="JSON experiments (default: settings / RECSYS_EXPERIMENTS, else a demo)",
    )
    ap.add_argument("--max-users", type=int)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--content", action="store_true", help="add pretrained content + MMR")
    args = ap.parse_args(argv)
    experiments = (
        parse_experiments(args.experiments)
        if args.experiments
        else load_experiments(get_settings())
    ) or parse_experiments(DEMO_EXPERIMENTS)
    heldout, recommend = offline_arms(
        args.data, max_users=args.max_users, seed=args.seed, content=args.content
    )
    args.log.unlink(missing_ok=True)
    stats = replay(heldout, experiments, recommend, ExposureLog(args.log), k=args.k)
    print(f"replayed {len(heldout)} held-out users into {args.log}: {dict(stats)}")
    print(format_table(summarise(read_log(args.log))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
