"""``make eval``'s served system: the real gateway evaluated on the offline protocol."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from core.config import Settings


@pytest.mark.timeout(900)
def test_served_gateway_is_evaluated_like_the_offline_systems(
    model_repository: Path, small_dataset_dir: Path, tmp_path: Path
) -> None:
    from ops.served_eval import ServedGateway
    from training.data import load_dataset
    from training.evaluation.protocol import make_split
    from training.evaluation.runner import EvalOptions, run_evaluation, smoke_subset

    settings = Settings(
        model_repository=model_repository,
        data_dir=small_dataset_dir,
        readiness_poll_s=0.5,
        segments=4,
    )
    served = ServedGateway(settings, tmp_path / "var")
    opts = EvalOptions(
        data=small_dataset_dir,
        out=tmp_path / "eval",
        smoke=True,
        val_quantiles=(0.8,),
        bootstrap_samples=50,
        extra_systems=[served],
    )
    try:
        result = run_evaluation(opts)
        # the fold-in went through IngestEvents: a test user's positives are on its profile
        split = make_split(smoke_subset(load_dataset(small_dataset_dir), seed=0), fold_in=3)
        positives = split.observed[split.observed["weight"] > 0]
        user = str(positives["user_id"].iloc[0])
        profile = served.client.profile(user)
    finally:
        served.close()
    assert "pipeline_served" not in result["skipped"], result["skipped"]
    row = result["metrics"]["all"]["pipeline_served"]
    assert row["users"] == result["metrics"]["all"]["popularity"]["users"]
    assert 0.0 <= row["ndcg@10"] <= 1.0 and row["coverage@10"] > 0
    wanted = set(positives.loc[positives["user_id"] == user, "item_id"].astype(str))
    assert wanted <= set(profile.recent_item_ids)


def test_the_served_catalogue_is_the_one_that_existed_when_training_ends() -> None:
    import pandas as pd

    from ops.served_eval import later_items, released
    from training.data.schema import Dataset

    at = pd.Timestamp("2025-04-10", tz="UTC")
    events = pd.DataFrame(
        {"user_id": ["u1", "u1"], "item_id": ["old", "early"], "timestamp": [at, at]}
    )
    items = pd.DataFrame(
        {
            "item_id": ["old", "unknown_age", "later", "early"],
            "created_at": [at - pd.Timedelta(days=d) for d in (9, 0, -1, -3)],
        }
    )
    items.loc[1, "created_at"] = pd.NaT
    kept = released(Dataset(events, items)).items["item_id"].tolist()
    # "later" is left out: the ranker's training replay never saw it at this point, and it
    # would set the gateway's clock a day ahead; "early" has events (messy data): kept
    assert kept == ["old", "unknown_age", "early"]
    no_times = Dataset(events, items.drop(columns="created_at"))
    assert released(no_times) is no_times
    assert later_items(no_times).empty  # nothing to create as fold-in points pass


class _Gateway:
    """The calls the served system makes, recorded (no stack)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def upsert_items(self, items: list[Any]) -> None:
        self.calls.append(("upsert", [i.item_id for i in items]))

    def ingest(self, events: list[Any]) -> Any:
        return SimpleNamespace(accepted_count=len(events), duplicate_count=0)

    def recommend(self, user: str, k: int) -> Any:
        self.calls.append(("recommend", [user]))
        # as the gateway: the last slot of a list goes to a new item ("n")
        ranked = [f"i{n}" for n in range(k - 1)] + ["n"]
        return SimpleNamespace(
            degraded=False, items=[SimpleNamespace(item=SimpleNamespace(item_id=i)) for i in ranked]
        )


def test_items_created_after_the_split_arrive_before_the_first_fold_in_point_past_them(
    tmp_path: Path,
) -> None:
    """Users are served in the order of their fold-in points, and each finds the items
    created up to that point (and none created later), as UpsertItems would have added them."""
    import pandas as pd

    from ops.served_eval import ServedGateway, later_items
    from training.data.schema import Dataset

    day = pd.Timedelta(days=1)
    split = pd.Timestamp("2025-04-10", tz="UTC")
    train = Dataset(
        pd.DataFrame({"user_id": ["u0"], "item_id": ["old"], "timestamp": [split]}),
        pd.DataFrame(
            {
                "item_id": ["old", "c", "a", "b"],
                "title": ["Old", "C", "A", "B"],
                "categories": [["x"]] * 4,
                "text": [""] * 4,
                "created_at": [split - day, split + 10 * day, split + day, split + 3 * day],
            }
        ),
    )
    served = ServedGateway(Settings(), tmp_path)
    gateway = _Gateway()
    served._client = gateway  # type: ignore[assignment]
    served._later = later_items(train)
    fold_in = pd.DataFrame(
        {
            "user_id": ["u2", "u1", "u2"],
            "item_id": ["old"] * 3,
            "event_type": ["click"] * 3,
            "value": [float("nan")] * 3,
            "timestamp": [split + 5 * day, split + 2 * day, split + 4 * day],
        }
    )
    served.observe(fold_in)
    lists = served.recommend(["u2", "u1"], k=20)
    assert gateway.calls == [
        ("upsert", ["a"]),  # created a day after the split, before u1's fold-in point
        ("recommend", ["u1"]),  # for 10, then for 20
        ("recommend", ["u1"]),
        ("upsert", ["b"]),
        ("recommend", ["u2"]),  # "c" is created after every fold-in point: never upserted
        ("recommend", ["u2"]),
    ]
    # the top 10 is the answer for 10, its exploration slot included; then the rest of 20's
    assert lists["u1"] == [*(f"i{n}" for n in range(9)), "n", *(f"i{n}" for n in range(9, 19))]
