from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from core.config import REPO_ROOT
from training.config import TrainConfig, load_config
from training.loop import latest_checkpoint

CONFIGS = REPO_ROOT / "training" / "configs"


def test_shipped_configs_parse() -> None:
    local = load_config(CONFIGS / "local.yaml")
    assert local.num_workers == 2 and local.use_gpu is False and local.num_cpus == 2
    assert local.retrieval.max_seq_len == 64 and local.retrieval.epochs <= 2
    assert isinstance(local.retrieval.lr, float)
    gpu = load_config(CONFIGS / "gpu.yaml")
    assert gpu.use_gpu is True and gpu.num_workers > 2
    assert gpu.retrieval.eval_candidates is None
    assert (REPO_ROOT / local.data_dir / "ratings.csv").exists()


def test_overrides_and_validation(tmp_path: Path) -> None:
    cfg = load_config(
        CONFIGS / "local.yaml", ["retrieval.epochs=3", "ranker.lr=1e-3", "name=x", "seed=7"]
    )
    assert cfg.retrieval.epochs == 3 and cfg.ranker.lr == 1e-3 and cfg.name == "x"
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(None, ["retrieval.nope=1"])
    with pytest.raises(ValueError, match="true/false"):
        load_config(None, ["use_gpu=maybe"])
    with pytest.raises(ValueError, match="integer"):
        load_config(None, ["num_workers=1.5"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["oops"])
    with pytest.raises(ValueError, match="content_source must be one of"):
        load_config(None, ["sequence.content_source=minilm"])
    assert load_config(None, ["sequence.content_source=pretrained"]).sequence.content_source == (
        "pretrained"
    )
    with pytest.raises(ValueError, match="choice_seeds and members must be at least 1"):
        load_config(None, ["feature_ranker.choice_windows=0"])
    with pytest.raises(ValueError, match="got 4, 2 and 0"):
        load_config(None, ["feature_ranker.members=0"])
    assert load_config(None, ["feature_ranker.choice_windows=4"]).feature_ranker.choice_windows == 4
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()


def test_latest_checkpoint(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "none") is None
    for i, epoch in enumerate([1, 0, 2]):
        d = tmp_path / f"checkpoint_{i}"
        d.mkdir()
        (d / "train_state.pt").write_bytes(b"x")
        (d / "metrics.json").write_text(f'{{"latest": {{"epoch": {epoch}}}}}')
    (tmp_path / "checkpoint_9").mkdir()  # incomplete: ignored
    found = latest_checkpoint(tmp_path)
    assert found is not None and found[0].name == "checkpoint_2" and found[1] == 2


def test_tasks_between_stages_take_every_cpu_of_the_workers_that_one_node_has() -> None:
    from training.train import between_stages_cpus

    local = load_config(REPO_ROOT / "training" / "configs" / "local.yaml")
    assert between_stages_cpus(local, [2]) == 2  # both workers' CPUs, not one worker's
    big = dataclasses.replace(local, num_workers=8, cpus_per_worker=4)
    assert between_stages_cpus(big, [16, 8]) == 16  # a task runs on one node
    assert between_stages_cpus(big, []) == 32
    assert between_stages_cpus(big, [2]) == 4  # never below one worker's share
    gpu = load_config(REPO_ROOT / "training" / "configs" / "gpu.yaml")
    assert between_stages_cpus(gpu, [64]) == gpu.cpus_per_worker  # the GPU does the work
