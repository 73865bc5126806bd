"""MLflow tracking (training/tracking.py) against a real local file store, read back with
MLflow's own client: the parent run of a training run with the config as parameters, a
nested run per stage with its per-epoch metrics, the exported release as artifacts; a failed
run, an unreachable server. The integration test trains one tiny Ray Train stage whose rank-0
worker logs every epoch through Ray's ``setup_mlflow``.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from training import tracking
from training.config import TrainConfig, load_config

CONFIG = Path(__file__).resolve().parents[2] / "training" / "configs" / "local.yaml"
MLFLOW_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_RUN_ID",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "MLFLOW_ALLOW_FILE_STORE",
    "MLFLOW_DISABLE_TELEMETRY",
)


@pytest.fixture(autouse=True)
def _mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ambient MLflow settings; what the tracker sets is undone after each test."""
    for name in MLFLOW_ENV:
        monkeypatch.delenv(name, raising=False)


def _cfg(root: Path, *overrides: str) -> TrainConfig:
    return load_config(
        None,
        [
            f"storage_path={root / 'runs'}",
            f"output_dir={root / 'final'}",
            "name=tiny",
            "tracking.max_artifact_mb=0.01",
            *overrides,
        ],
    )


def _client(cfg: TrainConfig, monkeypatch: pytest.MonkeyPatch) -> Any:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking.tracking_uri(cfg))


def _runs(client: Any) -> tuple[Any, dict[str, Any]]:
    """The one parent run and its nested runs by name."""
    exp = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    children = {r.info.run_name: r for r in runs if r not in parents}
    for child in children.values():
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    return parents[0], children


def _steps(client: Any, run: Any, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]


def _write_release(out: Path, metrics: dict[str, Any]) -> None:
    (out / "user_tower").mkdir(parents=True)
    (out / "user_tower" / "config.json").write_text('{"hidden_size": 32}\n')
    (out / "user_tower" / "model.safetensors").write_bytes(b"\0" * 50_000)  # over 0.01 MB
    (out / "train_config.yaml").write_text("name: tiny\n")
    (out / "metrics.json").write_text(json.dumps(metrics))


def test_tracking_uri_and_experiment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(tmp_path)
    assert tracking.tracking_uri(cfg) == (tmp_path / "runs" / "mlruns").as_uri()
    assert tracking.experiment_name(cfg) == "recsys-training"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    assert tracking.tracking_uri(cfg) == "http://mlflow:5000"
    assert tracking.experiment_name(cfg) == "from-env"
    # a value in the config wins over the environment; a plain path is a file store
    cfg = _cfg(tmp_path, f"tracking.tracking_uri={tmp_path / 'store'}", "tracking.experiment=x")
    assert tracking.tracking_uri(cfg) == (tmp_path / "store").as_uri()
    assert tracking.experiment_name(cfg) == "x"
    assert tracking.metric_name("ndcg@10") == "ndcg_at_10"


def test_parent_run_stage_runs_epochs_and_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(tmp_path)
    retrieval = [
        {"epoch": -1, "recall_at_10": 0.05},  # evaluation before training: step 0
        {"epoch": 0, "train_loss": 2.0, "recall_at_10": 0.10},
        {"epoch": 1, "train_loss": 1.5, "recall_at_10": 0.20},
        {"epoch": 2, "train_loss": 1.2, "recall_at_10": 0.25},
    ]
    ranker = [{"epoch": 0, "train_loss": 0.7, "ndcg@10": 0.3}, {"epoch": 1, "ndcg@10": 0.4}]

    @tracking.tracked
    def run(cfg: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
        stage = tracking.stage("retrieval", cfg.retrieval)
        assert stage is not None and stage["stage"] == "retrieval"
        assert not tracking.worker_logger(stage, rank=1).active  # rank 0 only
        logger = tracking.worker_logger(stage, rank=0)  # Ray's setup_mlflow
        assert logger.active
        for epoch in retrieval[:2]:
            logger.log_epoch(epoch)
        logger.end()
        # a worker group restarted after a failure logs into the same run
        logger = tracking.worker_logger(stage, rank=0)
        logger.log_epoch(retrieval[2])  # the last epoch is left to the driver's backfill
        logger.end()
        # the ranker "was finished already" (--resume): no live run, only its history
        metrics = {
            "retrieval": {"final": retrieval[-1], "epochs": retrieval},
            "ranker": {"final": ranker[-1], "epochs": ranker},
            "data": {"events": 1000, "split_train_max_ts": "2018-01-01", "report": {"rows": 9}},
            "timing_seconds": {"retrieval": 12.5, "total": 30.0},
            "pretrained_model": "/models/minilm",
        }
        _write_release(cfg.export_dir(), metrics)
        return metrics

    run(cfg, resume=False)

    client = _client(cfg, monkeypatch)
    parent, stages = _runs(client)
    assert parent.info.status == "FINISHED" and parent.info.run_name.startswith("tiny-")
    params = parent.data.params
    assert params["retrieval.epochs"] == str(cfg.retrieval.epochs)
    assert params["ranker.lr"] == str(cfg.ranker.lr) and params["seed"] == "0"
    assert "tracking.tracking_uri" not in params
    tags = parent.data.tags
    assert tags["recsys.resume"] == "False"
    assert tags["recsys.release_dir"] == str(cfg.export_dir())
    assert tags["recsys.pretrained_model"] == "/models/minilm"
    assert tags["recsys.data.split_train_max_ts"] == "2018-01-01"
    m = parent.data.metrics
    assert m["retrieval.recall_at_10"] == 0.25 and m["ranker.ndcg_at_10"] == 0.4
    assert m["data.events"] == 1000 and m["data.report.rows"] == 9
    assert m["seconds.retrieval"] == 12.5 and m["seconds.total"] == 30.0

    assert set(stages) == {"retrieval", "ranker"}
    ret = stages["retrieval"]
    assert ret.info.status == "FINISHED" and ret.data.params["epochs"] == str(cfg.retrieval.epochs)
    # every epoch exactly once: live ones (steps 0-2) and the backfilled last one (step 3)
    assert _steps(client, ret, "recall_at_10") == [(0, 0.05), (1, 0.10), (2, 0.20), (3, 0.25)]
    assert _steps(client, ret, "train_loss") == [(1, 2.0), (2, 1.5), (3, 1.2)]
    rk = stages["ranker"]
    assert rk.data.tags["recsys.reused_checkpoint"] == "true"
    assert _steps(client, rk, "ndcg_at_10") == [(1, 0.3), (2, 0.4)]

    files = {a.path for a in client.list_artifacts(parent.info.run_id, "release")}
    assert {"release/metrics.json", "release/train_config.yaml", "release/SKIPPED.txt"} <= files
    nested = {a.path for a in client.list_artifacts(parent.info.run_id, "release/user_tower")}
    assert nested == {"release/user_tower/config.json"}  # the weights stayed out
    local = client.download_artifacts(parent.info.run_id, "release", str(tmp_path / "dl"))
    assert "user_tower/model.safetensors\t50000 bytes" in (Path(local) / "SKIPPED.txt").read_text()
    assert json.loads((Path(local) / "metrics.json").read_text())["data"]["events"] == 1000


def test_failed_run_is_marked_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(tmp_path)

    @tracking.tracked
    def run(cfg: TrainConfig) -> dict[str, Any]:
        logger = tracking.worker_logger(tracking.stage("retrieval", cfg.retrieval), rank=0)
        logger.log_epoch({"epoch": 0, "train_loss": 1.0})
        logger.end()  # the stage finished
        tracking.stage("ranker", cfg.ranker)
        raise RuntimeError("worker group died")

    with pytest.raises(RuntimeError, match="worker group died"):
        run(cfg)
    parent, stages = _runs(_client(cfg, monkeypatch))
    assert parent.info.status == "FAILED" and stages["ranker"].info.status == "FAILED"
    assert stages["retrieval"].info.status == "FINISHED"


def test_unreachable_server_only_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _cfg(
        tmp_path,
        f"tracking.tracking_uri=http://127.0.0.1:{port}",
        "tracking.max_retries=0",
        "tracking.timeout_s=2",
    )

    @tracking.tracked
    def run(cfg: TrainConfig) -> dict[str, Any]:
        assert tracking.stage("retrieval", cfg.retrieval) is None  # training goes on
        return {"retrieval": {"final": {}, "epochs": []}}

    t0 = time.time()
    with caplog.at_level("WARNING", logger="training.tracking"):
        assert run(cfg) == {"retrieval": {"final": {}, "epochs": []}}
    assert time.time() - t0 < 30
    assert "MLflow tracking off for this run" in caplog.text


def test_disabled_tracking_writes_nothing(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "tracking.enabled=false")
    tracking.tracked(lambda cfg: {"stage": tracking.stage("x", None)})(cfg)
    assert not (tmp_path / "runs" / "mlruns").exists()


# --------------------------------------------------------------------------------------------
# one real Ray Train stage


@pytest.mark.integration
def test_ray_train_stage_logs_every_epoch_from_rank_0(
    ray_local: None, tiny_bert: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from training.prepare import prepare_data
    from training.tasks import RetrievalTask
    from training.train import fit

    cfg = load_config(
        CONFIG,
        [
            f"pretrained_model={tiny_bert}",
            f"storage_path={tmp_path / 'runs'}",
            f"output_dir={tmp_path / 'final'}",
            "name=tracked",
            "history_len=5",
            "max_chars=200",
            "retrieval.max_examples=32",
            "retrieval.batch_size=8",
            "retrieval.epochs=2",
            "retrieval.max_seq_len=32",
            "retrieval.eval_users=5",
            "retrieval.eval_candidates=50",
            "sequence.enabled=false",
            "feature_ranker.enabled=false",
        ],
    )
    live: dict[str, list[tuple[int, float]]] = {}

    @tracking.tracked
    def run(cfg: TrainConfig) -> dict[str, Any]:
        data = prepare_data(cfg)
        task = RetrievalTask(cfg.retrieval)
        ckpt = fit(cfg, task, data.retrieval_train, data.retrieval_eval, tiny_bert, False)
        # what rank 0 logged while training, before the driver completes anything
        client = _client(cfg, monkeypatch)
        run_id = tracking._active.stages["retrieval"]  # type: ignore[union-attr]
        for key in ("train_loss", "recall_at_10"):
            live[key] = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        history = json.loads((ckpt / "metrics.json").read_text())["history"]
        return {"retrieval": {"final": history[-1], "epochs": history}}

    metrics = run(cfg)
    history = metrics["retrieval"]["epochs"]
    assert [e["epoch"] for e in history] == [0, 1]
    assert live["train_loss"] == [(e["epoch"] + 1, e["train_loss"]) for e in history]
    assert [s for s, _ in live["recall_at_10"]] == [1, 2]
    parent, stages = _runs(_client(cfg, monkeypatch))
    assert parent.info.status == "FINISHED" and stages["retrieval"].info.status == "FINISHED"
    assert parent.data.metrics["retrieval.train_loss"] == history[-1]["train_loss"]
    assert (
        _steps(_client(cfg, monkeypatch), stages["retrieval"], "train_loss") == live["train_loss"]
    )
