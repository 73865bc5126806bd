"""``make eval``'s served system: the real gateway evaluated on the offline protocol."""

from __future__ import annotations

from pathlib import Path

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

    from ops.served_eval import released
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
