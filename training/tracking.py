"""MLflow tracking of training runs (``tracking:`` section of the config, :class:`TrackingConfig`).

What one ``python -m training.train`` (one call of :func:`training.train.run`) leaves in the
MLflow experiment (``tracking.experiment``, default ``recsys-training``):

* a **parent run** ``<name>-<UTC start time>``: the whole ``TrainConfig`` as parameters
  (``retrieval.lr``, ``ranker.epochs``, ...), the data counts (metrics ``data.*``), the stage
  timings (``seconds.*``), every stage's final metrics (``<stage>.<metric>``), tags (resume,
  release directory, pretrained model, git commit when there is one) and the exported release
  as artifacts (``release/``: ``metrics.json``, ``train_config.yaml``, ``data_report.txt`` and
  each model directory's configs and vocabularies; files over ``max_artifact_mb``, the BERT
  weights, are listed with their size in ``release/SKIPPED.txt`` instead);
* a **nested run per stage** (``retrieval``, ``ranker``, ...; tag ``mlflow.parentRunId``): the
  stage's settings as parameters and its per-epoch metrics (step = epochs completed, 0 = the
  evaluation before training), logged live by rank 0 of the Ray Train worker group through
  Ray's ``ray.air.integrations.mlflow.setup_mlflow``. The driver creates the stage run and
  hands its id to the workers, so a worker group restarted after a failure keeps logging into
  the same run. At the end the driver adds every epoch of ``metrics.json`` the run does not
  have yet: the epochs a ``--resume`` restored, stages reused as finished, or epochs a worker
  could not log (a local file store on another node).

Where: ``tracking_uri`` when set, else ``MLFLOW_TRACKING_URI``, else a local file store
``<storage_path>/mlruns`` (works offline; ``mlflow ui --backend-store-uri runs/mlruns``).
Tracking never stops training: the first failure (a tracking server that is down, a full
disk) logs a warning and turns tracking off for the rest of the run.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

from core.config import REPO_ROOT
from training.config import TrainConfig, resolve_path

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "recsys-training"
#: the artifact directory of the exported release in the parent run
RELEASE_ARTIFACTS = "release"
SKIPPED_FILE = "SKIPPED.txt"
#: MLflow's own limits: parameters per log_batch call, characters per parameter value
_PARAMS_PER_BATCH = 100
_MAX_PARAM_CHARS = 6000
_METRICS_PER_BATCH = 1000

F = TypeVar("F", bound=Callable[..., dict[str, Any]])


# --------------------------------------------------------------------------------------------
# settings


def tracking_uri(cfg: TrainConfig) -> str:
    """The store a run goes to: the config's ``tracking_uri``, else ``MLFLOW_TRACKING_URI``,
    else the file store ``<storage_path>/mlruns`` (``<RECSYS_VAR_DIR>/mlruns`` when Ray's
    storage is a URI). A plain path becomes a ``file:`` URI."""
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        storage = cfg.storage()
        root = _var_dir() if "://" in storage else Path(storage)
        return (root / "mlruns").absolute().as_uri()
    if ":" not in uri:  # a local path, not file:/http:/databricks...
        return resolve_path(uri).absolute().as_uri()
    return uri


def experiment_name(cfg: TrainConfig) -> str:
    return cfg.tracking.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def mlflow_env(cfg: TrainConfig, uri: str) -> dict[str, str]:
    """The MLflow environment of the driver and the workers (values already set win): HTTP
    timeout and retries bounded so that a dead server costs seconds, not minutes; telemetry
    off (training runs offline); the file store allowed (MLflow 3 refuses it by default, in
    favour of a database, which mlflow-skinny cannot open; ``mlflow migrate-filestore``
    converts a store later)."""
    env = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(cfg.tracking.timeout_s),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(cfg.tracking.max_retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    if uri.startswith("file:"):
        env["MLFLOW_ALLOW_FILE_STORE"] = "true"
    return env


def _var_dir() -> Path:
    try:
        from core.config import get_settings

        return Path(get_settings().var_dir)
    except Exception:  # invalid RECSYS_* settings: the repository's var/
        return REPO_ROOT / "var"


# --------------------------------------------------------------------------------------------
# the driver: one parent run per training run


class Tracker:
    """The MLflow runs of one training run, on the driver. Every method swallows tracking
    errors (:meth:`_guard`): the first one is logged as a warning and turns tracking off."""

    def __init__(self, cfg: TrainConfig, client: Any, uri: str, experiment_id: str) -> None:
        self.cfg = cfg
        self.client = client
        self.uri = uri
        self.experiment_id = experiment_id
        self.run_id = ""
        self.stages: dict[str, str] = {}  # stage name -> nested run id
        self.broken = False

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def start(cls, cfg: TrainConfig, tags: Mapping[str, Any] | None = None) -> Tracker | None:
        """The parent run, created with the config as parameters; ``None`` when tracking is
        off or the store cannot be reached (a warning says why)."""
        if not cfg.tracking.enabled:
            return None
        uri = tracking_uri(cfg)
        for key, value in mlflow_env(cfg, uri).items():
            os.environ.setdefault(key, value)
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=uri)
            tracker = cls(cfg, client, uri, _experiment_id(client, experiment_name(cfg)))
            name = cfg.tracking.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            all_tags = {
                **_context_tags(),
                "recsys.config_name": cfg.name,
                "recsys.release_dir": str(cfg.export_dir()),
                **{f"recsys.{k}": str(v) for k, v in (tags or {}).items()},
            }
            run = client.create_run(tracker.experiment_id, run_name=name, tags=all_tags)
            tracker.run_id = run.info.run_id
            tracker._log_params(tracker.run_id, _config_params(cfg))
        except Exception as exc:
            log.warning("MLflow tracking off for this run: cannot use %s (%s)", uri, _brief(exc))
            return None
        print(f"[tracking] MLflow run {name} ({tracker.run_id}) in {uri}", flush=True)
        return tracker

    def stage(self, name: str, settings: Any) -> dict[str, Any] | None:
        """Create the nested run of a stage (its settings as parameters) and return what the
        workers need to log into it (``LoopConfig.tracking``), or ``None``."""

        def create() -> dict[str, Any]:
            run_id = self._stage_run(name, settings, reused=False)
            return {
                "tracking_uri": self.uri,
                "experiment_id": self.experiment_id,
                "run_id": run_id,
                "stage": name,
                "driver_node": _node_id(),
                "env": mlflow_env(self.cfg, self.uri),
            }

        return cast(dict[str, Any] | None, self._guard(f"{name} run", create))

    def finish(self, metrics: Mapping[str, Any] | None, release: Path | None) -> None:
        """Complete the runs from the final ``metrics.json`` content: missing epochs, final
        metrics, data counts, timings; the release as artifacts; status FINISHED."""
        if metrics is not None:
            self._guard("metrics", lambda: self._log_results(metrics))
        if release is not None and release.is_dir():
            self._guard("release artifacts", lambda: self._log_release(release))
        self.end("FINISHED")

    def end(self, status: str) -> None:
        """Terminate the parent run and the stage runs still running (FINISHED, FAILED or
        KILLED); a stage its worker already ended keeps its status and end time."""

        def terminate() -> None:
            for run_id in self.stages.values():
                if self.client.get_run(run_id).info.status == "RUNNING":
                    self.client.set_terminated(run_id, status)
            if self.run_id:
                self.client.set_terminated(self.run_id, status)

        self._guard("end", terminate)

    # -- what is logged ----------------------------------------------------------------------

    def _stage_run(self, name: str, settings: Any, *, reused: bool) -> str:
        tags = {"recsys.stage": name, "mlflow.parentRunId": self.run_id}
        if reused:
            tags["recsys.reused_checkpoint"] = "true"
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        run_id = str(run.info.run_id)
        self.stages[name] = run_id
        if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
            self._log_params(run_id, _flatten(dataclasses.asdict(settings)))
        return run_id

    def _log_results(self, metrics: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        parent: list[Any] = []
        for stage, block in metrics.items():
            if not (isinstance(block, Mapping) and isinstance(block.get("epochs"), list)):
                continue
            run_id = self.stages.get(stage) or self._stage_run(
                stage, getattr(self.cfg, stage, None), reused=True
            )
            self._backfill(run_id, block["epochs"])
            final = block.get("final") or {}
            step = epoch_step(final)
            for key, value in numeric(final).items():
                parent.append(Metric(f"{stage}.{key}", value, now, step))
        flat = _flatten({"data": metrics.get("data", {}), "seconds": metrics.get("timing_seconds")})
        parent += [Metric(k, v, now, 0) for k, v in numeric(flat).items()]
        texts = {f"recsys.{metric_name(k)}": v for k, v in flat.items() if isinstance(v, str)}
        if pretrained := metrics.get("pretrained_model"):
            texts["recsys.pretrained_model"] = str(pretrained)
        self._log_batch(self.run_id, parent)
        for key, text in texts.items():
            self.client.set_tag(self.run_id, key, text[:_MAX_PARAM_CHARS])

    def _backfill(self, run_id: str, epochs: list[Mapping[str, Any]]) -> None:
        """Log the epochs of a stage's history the run does not have yet (by step)."""
        from mlflow.entities import Metric

        keys = sorted({key for e in epochs for key in numeric(e)})
        logged = {
            (key, m.step) for key in keys for m in self.client.get_metric_history(run_id, key)
        }
        now = _now_ms()
        missing = [
            Metric(key, value, now, epoch_step(e))
            for e in epochs
            for key, value in numeric(e).items()
            if (key, epoch_step(e)) not in logged
        ]
        self._log_batch(run_id, missing)

    def _log_release(self, release: Path) -> None:
        """The release directory as artifacts, without files over ``max_artifact_mb``."""
        limit = int(self.cfg.tracking.max_artifact_mb * 1024 * 1024)
        skipped: list[str] = []
        with tempfile.TemporaryDirectory(prefix="mlflow-release-") as tmp:
            for path in sorted(p for p in release.rglob("*") if p.is_file()):
                rel = path.relative_to(release)
                size = path.stat().st_size
                if size > limit:
                    skipped.append(f"{rel}\t{size} bytes")
                    continue
                (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, Path(tmp) / rel)
            if skipped:
                (Path(tmp) / SKIPPED_FILE).write_text(
                    f"Not copied into MLflow (over tracking.max_artifact_mb = "
                    f"{self.cfg.tracking.max_artifact_mb} MB); the release is {release}\n"
                    + "\n".join(skipped)
                    + "\n"
                )
            self.client.log_artifacts(self.run_id, tmp, RELEASE_ARTIFACTS)

    # -- helpers ---------------------------------------------------------------------------

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_MAX_PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, len(items), _PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=items[i : i + _PARAMS_PER_BATCH])

    def _log_batch(self, run_id: str, metrics: list[Any]) -> None:
        for i in range(0, len(metrics), _METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=metrics[i : i + _METRICS_PER_BATCH])

    def _guard(self, what: str, fn: Callable[[], Any]) -> Any:
        if self.broken:
            return None
        try:
            return fn()
        except Exception as exc:
            if getattr(exc, "error_code", "") == "INVALID_PARAMETER_VALUE":  # data, not I/O
                log.warning("MLflow: %s not logged (%s)", what, _brief(exc))
                return None
            self.broken = True
            log.warning(
                "MLflow tracking off for the rest of this run: %s failed on %s (%s)",
                what,
                self.uri,
                _brief(exc),
            )
            return None


_active: Tracker | None = None


def tracked(fn: F) -> F:
    """Decorate ``run(cfg, ...)``: the parent run around it, the results and the release
    (``cfg.export_dir()``) logged when it returns, FAILED/KILLED when it raises."""

    @functools.wraps(fn)
    def wrapper(cfg: TrainConfig, *args: Any, **kwargs: Any) -> dict[str, Any]:
        global _active
        if _active is not None:  # nested: already tracked
            return fn(cfg, *args, **kwargs)
        tracker = Tracker.start(cfg, tags=kwargs)
        _active = tracker
        try:
            metrics = fn(cfg, *args, **kwargs)
        except BaseException as exc:
            if tracker is not None:
                tracker.end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            _active = None
        if tracker is not None:
            tracker.finish(metrics, cfg.export_dir())
        return metrics

    return cast(F, wrapper)


def stage(name: str, settings: Any) -> dict[str, Any] | None:
    """The ``LoopConfig.tracking`` of a stage about to train: a nested run under the active
    parent run, or ``None`` (no tracked run active, tracking off or broken)."""
    return None if _active is None else _active.stage(name, settings)


# --------------------------------------------------------------------------------------------
# the workers: rank 0 logs every epoch into the stage's run


class EpochLogger:
    """Per-epoch metrics into the stage run from rank 0 (no-op elsewhere or when off)."""

    def __init__(self, mlflow: Any = None, stage: str = "") -> None:
        self._mlflow = mlflow
        self._stage = stage

    @property
    def active(self) -> bool:
        return self._mlflow is not None

    def log_epoch(self, metrics: Mapping[str, Any]) -> None:
        if self._mlflow is None:
            return
        try:
            self._mlflow.log_metrics(numeric(metrics), step=epoch_step(metrics))
        except Exception as exc:
            self._off(exc)

    def end(self) -> None:
        if self._mlflow is None:
            return
        try:
            self._mlflow.end_run()
        except Exception as exc:
            self._off(exc)

    def _off(self, exc: BaseException) -> None:
        log.warning("[%s] MLflow logging off in this worker (%s)", self._stage, _brief(exc))
        self._mlflow = None


def worker_logger(settings: Mapping[str, Any] | None, rank: int) -> EpochLogger:
    """Ray's ``setup_mlflow`` on rank 0, attached to the stage run the driver created
    (``MLFLOW_RUN_ID``: ``mlflow.start_run`` resumes it, also after a worker-group restart).
    A no-op logger on other ranks, without settings, or on a node other than the driver's
    when the store is a local file store (the driver logs those epochs at the end)."""
    if not settings or rank != 0:
        return EpochLogger()
    stage_name = str(settings.get("stage", ""))
    uri = str(settings["tracking_uri"])
    if uri.startswith("file:") and settings.get("driver_node") not in (None, _node_id()):
        return EpochLogger()
    for key, value in dict(settings.get("env") or {}).items():
        os.environ.setdefault(key, str(value))
    os.environ["MLFLOW_RUN_ID"] = str(settings["run_id"])
    try:
        from ray.air.integrations.mlflow import setup_mlflow

        mlflow = setup_mlflow(
            tracking_uri=uri,
            experiment_id=str(settings["experiment_id"]),
            run_name=stage_name,
            rank_zero_only=True,
        )
        return EpochLogger(mlflow, stage_name)
    except Exception as exc:
        log.warning("[%s] MLflow logging off in this worker (%s)", stage_name, _brief(exc))
        return EpochLogger()
    finally:
        os.environ.pop("MLFLOW_RUN_ID", None)


# --------------------------------------------------------------------------------------------
# shared helpers


def epoch_step(metrics: Mapping[str, Any]) -> int:
    """MLflow step of an epoch's metrics: epochs completed (``epoch`` is 0-based; the
    evaluation before training has epoch -1, step 0)."""
    try:
        return int(metrics.get("epoch", -1)) + 1
    except (TypeError, ValueError):
        return 0


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The metric values MLflow can take (numbers, not ``epoch``: that is the step), under
    names MLflow accepts (:func:`metric_name`)."""
    out = {}
    for key, value in metrics.items():
        if key == "epoch" or isinstance(value, str) or value is None:
            continue
        try:
            out[metric_name(key)] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def metric_name(key: str) -> str:
    """MLflow names allow letters, digits, ``_ - . / :`` and spaces: ``ndcg@10`` is logged
    as ``ndcg_at_10`` (the spelling of the other stages' ``recall_at_10``)."""
    return re.sub(r"[^\w\-./: ]", "_", str(key).replace("@", "_at_"))


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (d or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _config_params(cfg: TrainConfig) -> dict[str, Any]:
    """The config as parameters, without the tracking URI (it may carry credentials)."""
    params = _flatten(cfg.to_dict())
    params.pop("tracking.tracking_uri", None)
    return params


def _experiment_id(client: Any, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    try:
        return str(client.create_experiment(name))
    except Exception:  # created meanwhile by a concurrent run
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return str(found.experiment_id)


def _context_tags() -> dict[str, str]:
    """MLflow's usual source tags (user, entry point, git commit), best effort."""
    try:
        from mlflow.tracking.context.registry import resolve_tags

        return {k: str(v) for k, v in resolve_tags({}).items()}
    except Exception:
        return {}


def _node_id() -> str | None:
    try:
        import ray

        return str(ray.get_runtime_context().get_node_id()) if ray.is_initialized() else None
    except Exception:
        return None


def _now_ms() -> int:
    return math.floor(time.time() * 1000)


def _brief(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."
