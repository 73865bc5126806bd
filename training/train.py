"""Train the two-tower retriever, then the CTR ranker, on Ray Train; export the results.

Usage::

    python -m training.train --config training/configs/local.yaml [--resume] \\
        [--set retrieval.epochs=1 --set ranker.max_examples=100 ...]

    # on a Ray cluster with GPUs (the driver connects with ray.init(address="auto")):
    ray job submit --working-dir . -- python -m training.train --config training/configs/gpu.yaml

Stages (:func:`run`):

1. prepare data (:mod:`training.prepare`): load, split by time, build examples;
2. train retrieval: ``TorchTrainer(train_func)`` (:mod:`training.loop`) running the
   :class:`~training.tasks.RetrievalTask`; Recall@10 per epoch on validation users;
3. mine hard negatives: the trained towers rank a candidate pool for every ranker example
   (a Ray task, on a GPU when ``use_gpu``); each positive gets random + hard negatives;
4. train the ranker: the same loop running the :class:`~training.tasks.RankerTask`; AUC and
   log-loss per epoch;
5. train the sequence model (``sequence.enabled``): the items' frozen content vectors (by
   default the catalogue under the trained item tower, encoded once per run and reused by
   the feature ranker), then the same loop running the :class:`~training.tasks.SequenceTask`
   over every user's training-period events; NDCG@10 of validation users' next positives
   per epoch;
6. train the feature ranker (``feature_ranker.enabled``): the gateway's candidates replayed
   at cut-offs inside the training period on those catalogue vectors (with the sequence
   model as a source and features), then the same loop running the
   :class:`~training.tasks.FeatureRankerTask`; AUC and NDCG@10 per epoch. The ranker and
   the sequence model are served only where they earn their Triton requests on the last
   cut-offs' users (:mod:`training.release_choice`);
7. export to ``output_dir`` (default ``<storage_path>/<name>/final``): ``user_tower/``,
   ``item_tower/``, ``ranker/``, ``feature_ranker/``, ``sequence/`` (weights, config, item-id
   vocabulary, content matrix, request-time snapshots), ``metrics.json`` (per-epoch history
   of every stage, data counts, timings), ``train_config.yaml`` and ``data_report.txt``.

Resume: without ``--resume`` the Ray run directories (``<storage_path>/<name>-<stage>``)
are deleted and training starts from the pretrained model. With ``--resume`` a finished
stage is reused as is and an unfinished one continues after its latest checkpoint (Ray Train
restores the run with the same name and storage path, and the latest checkpoint is also
passed to the loop as ``resume_from``). Inside one run, a failed worker group is restarted
from the latest checkpoint up to ``max_failures`` times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import yaml
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from core.behaviour import popularity_half_life
from core.config import REPO_ROOT, get_settings
from core.text import item_texts
from training import tracking
from training.config import TrainConfig, load_config, resolve_path
from training.data.candidates import (
    Catalogue,
    SequenceAt,
    SequenceScores,
    training_cutoffs,
)
from training.data.exposures import load_exposures
from training.loop import LoopConfig, latest_checkpoint, train_func
from training.models.sequence import SASRec, load_sequence_model, model_scores, twin_scorer
from training.models.sequence_data import content_vectors
from training.prepare import PreparedData, mining_queries, prepare_data, ranker_pairs
from training.pretrained import OFFLINE_ENV, set_offline
from training.ray_cluster import connect
from training.release_choice import choose_release
from training.sequence_choice import choose_sequence
from training.tasks import FeatureRankerTask, RankerTask, RetrievalTask, SequenceTask, Task
from training.tasks.feature_ranker import feature_scaling, replayed_groups
from training.tasks.retrieval import mine_with_towers, tower_vectors


@tracking.tracked  # one MLflow run per call (training/tracking.py)
def run(cfg: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """The whole pipeline; returns the final ``metrics.json`` content."""
    t_start = time.time()
    timings: dict[str, float] = {}
    pretrained = cfg.pretrained_dir()
    print(f"[config] pretrained model: {pretrained}", flush=True)
    data = prepare_data(cfg)
    init_ray(cfg)

    retrieval = RetrievalTask(cfg.retrieval)
    with _timed(timings, "retrieval"):
        ret_dir = fit(cfg, retrieval, data.retrieval_train, data.retrieval_eval, pretrained, resume)

    catalogue = CatalogueVectors(cfg, data.dataset.items, ret_dir / "item_tower", timings)

    ranker = RankerTask(cfg.ranker)
    ranker_done = resume and _finished(cfg, ranker)
    train_pairs: list[dict[str, Any]] = []
    eval_pairs: list[dict[str, Any]] = []
    with _timed(timings, "mining"):
        hard = None if ranker_done else mine_hard_negatives(cfg, data, ret_dir)
    if hard is not None:  # a finished ranker is reused by fit(): no pairs needed
        train_pairs, eval_pairs = ranker_pairs(cfg, data, *hard)

    with _timed(timings, "ranker"):
        rk_dir = fit(cfg, ranker, train_pairs, eval_pairs, pretrained, resume)

    seq_dir = None
    if cfg.sequence.enabled:
        with _timed(timings, "sequence"):
            seq_dir = fit_sequence(cfg, data, pretrained, resume, catalogue)

    fr_dir = None
    if cfg.feature_ranker.enabled:
        with _timed(timings, "feature_ranker"):
            with_seq = seq_dir if cfg.feature_ranker.sequence else None
            fr_dir = fit_feature_ranker(cfg, data, catalogue, pretrained, resume, with_seq)

    info = dict(data.info)
    if not ranker_done:
        info.update(ranker_train_pairs=len(train_pairs), ranker_eval_pairs=len(eval_pairs))
    stages = {"sequence": seq_dir, "feature_ranker": fr_dir}
    return export(cfg, data, ret_dir, rk_dir, info, timings, t_start, pretrained, stages)


def fit(
    cfg: TrainConfig,
    task: Task[Any, Any],
    train_rows: list[dict[str, Any]],
    eval_data: Any,
    pretrained: str,
    resume: bool,
) -> Path:
    """Train one stage with Ray Train; returns the local directory of its final checkpoint
    (without training when ``resume`` finds the stage finished)."""
    run_dir = cfg.run_dir(task.name)
    resume_from, finished = _previous_run(run_dir, task, resume)
    if finished and resume_from is not None:
        return resume_from
    config = LoopConfig(
        task=task,
        pretrained=pretrained,
        seed=cfg.seed,
        torch_threads=cfg.cpus_per_worker,
        train_examples=ray.put(train_rows),
        eval_data=ray.put(eval_data),
        resume_from=str(resume_from) if resume_from else None,
        fail_marker=str(run_dir.parent / f".{run_dir.name}.failed_once"),
        tracking=tracking.stage(task.name, task.cfg),
    )
    gpu = {"GPU": 1} if cfg.use_gpu else {}
    trainer = TorchTrainer(
        train_func,
        train_loop_config=config.to_dict(),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **gpu},
        ),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=cfg.storage(),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    t0 = time.time()
    result = trainer.fit()
    print(f"[{task.name}] finished in {time.time() - t0:.1f}s", flush=True)
    return _local_checkpoint(cfg, task.name, result)


def fit_sequence(
    cfg: TrainConfig,
    data: PreparedData,
    pretrained: str,
    resume: bool,
    catalogue: CatalogueVectors,
) -> Path:
    """The sequence stage: the items' content vectors (skipped when ``resume`` finds the
    stage finished), the item space put into Ray's object store once, then :func:`fit`.

    ``content_source: item_tower`` takes the trained item tower's vectors of the catalogue,
    the ones the feature ranker and Milvus get (one BERT content encoder, encoded once per
    run); ``pretrained`` encodes the catalogue again with the frozen ``content_model``."""
    seq = cfg.sequence
    if resume and _finished(cfg, SequenceTask(seq, space=None)):
        return fit(cfg, SequenceTask(seq, space=None), [], None, pretrained, resume)
    space = data.sequence_space
    if space is None:
        raise ValueError("sequence stage enabled but no sequences were prepared")
    if seq.use_content:
        t0 = time.time()
        if seq.content_source == "item_tower":
            vectors = catalogue.rows(space.item_ids)
        else:
            vectors = content_vectors(
                data.dataset.items,
                space.item_ids,
                model_dir=seq.content_model or pretrained,
                max_seq_len=seq.content_max_seq_len,
                cache=seq.content_cache,
            )
        space = space.with_content(vectors)
        print(
            f"[sequence] content vectors ({seq.content_source}) {vectors.shape} "
            f"in {time.time() - t0:.1f}s"
        )
    if data.train_events is not None:
        content = space.content if space.content.size else None
        choice = choose_sequence(
            seq, data.train_events, space.item_ids, content, seed=cfg.seed, log=_print
        )
        data.info["sequence_choice"] = choice.as_dict()
        print(f"[sequence] {choice}", flush=True)
        seq = choice.config
    task = SequenceTask(seq, space=ray.put(space))
    return fit(cfg, task, data.sequence_train, data.sequence_eval, pretrained, resume)


def fit_feature_ranker(
    cfg: TrainConfig,
    data: PreparedData,
    catalogue: CatalogueVectors,
    pretrained: str,
    resume: bool,
    seq_dir: Path | None = None,
) -> Path:
    """The feature-ranker stage: the catalogue's vectors from the trained item tower (what
    indexing puts into Milvus), the gateway's candidates replayed at cut-offs inside the
    training period, then :func:`fit`.

    With a sequence model (``seq_dir``) it is a candidate source and a feature, as served.
    The served model was trained on the whole training period, so it has seen what the
    cut-offs' users did next: the training groups at each cut-off get a replay model trained
    in this process on the events before that cut-off only (:func:`replay_twins`), the
    validation groups, whose targets lie after the training period, the served model
    itself. With ``choose_release`` the replay is also run without it, and
    :func:`~training.release_choice.choose_release` decides whether the release serves the
    ranker and the sequence model (its evidence in ``metrics.json``'s
    ``data.release_choice``). The ranker is trained on the replay of the chosen sequence
    setting either way (its metrics are kept); one the release does not serve is saved as
    such, and one trained without the sequence model makes a release that serves none."""
    fr = dataclasses.replace(cfg.feature_ranker, sequence=seq_dir is not None)
    if resume and _finished(cfg, FeatureRankerTask(fr)):
        return fit(cfg, FeatureRankerTask(fr), [], None, pretrained, resume)
    train, test = data.train_events, data.test_events
    if train is None or test is None:
        raise ValueError("feature ranker enabled but the time split was not prepared")
    items = data.dataset.items
    item_ids, vectors = catalogue.vectors()
    t0 = time.time()
    candidates = Catalogue.build(items, item_ids, vectors)
    cuts = training_cutoffs(train, fr.cutoffs)
    twin_at: SequenceAt | None = None
    served: SequenceScores | None = None
    if seq_dir is not None:
        model = load_sequence_model(seq_dir / "sequence")
        twin_at = replay_twins(model, train, item_ids)
        served = model_scores(model, item_ids)
    half_life = popularity_half_life(train, get_settings().popularity_half_life_days)
    data.info["popularity_half_life_days"] = half_life  # as indexing these events chooses
    print(f"[feature_ranker] popularity half-life {half_life:g} days", flush=True)
    exposures = load_exposures(resolve_path(cfg.data_dir))  # logged responses, if exported
    groups, held_out = replayed_groups(
        candidates,
        train,
        test,
        fr,
        cuts,
        cfg.seed,
        twin_at,
        served,
        half_life,
        exposures,
    )
    if not groups:
        raise ValueError("no feature-ranker training groups: too few users after the cut-offs")
    served_ranker = True
    if fr.choose_release:
        t1 = time.time()
        plain = (groups, held_out)
        if twin_at is not None:
            plain = replayed_groups(
                candidates, train, test, fr, cuts, cfg.seed, None, None, half_life, exposures
            )
        choice = choose_release(
            groups if twin_at is not None else None,
            plain[0],
            dataclasses.replace(fr, batch_size=fr.batch_size * cfg.num_workers),  # global batch
            get_settings().retrieval_weights,
            range(cfg.seed, cfg.seed + fr.choice_seeds),
        )
        data.info["release_choice"] = choice.as_dict()
        print(f"[feature_ranker] {choice}, in {time.time() - t1:.1f}s", flush=True)
        served_ranker = choice.ranker
        if not choice.sequence:
            fr = dataclasses.replace(fr, sequence=False)
            groups, held_out = plain
    print(
        f"[feature_ranker] {len(groups)} training groups at {len(fr.cutoffs)} cut-offs, "
        f"{len(held_out)} validation users, in {time.time() - t0:.1f}s"
    )
    mean, std = feature_scaling(groups)
    task = FeatureRankerTask(fr, mean, std, served_ranker)
    return fit(cfg, task, groups, held_out, pretrained, resume)


def replay_twins(served: SASRec, events: pd.DataFrame, item_ids: Sequence[str]) -> SequenceAt:
    """At a cut-off, the served sequence model's twin (same catalogue, content vectors and
    settings, the chosen one's included) trained in this process on the ``events`` before
    it only: as current as the
    served model is when it serves. One twin for every cut-off, from the events before the
    first, left the later cut-offs' sequence features (its request-time term too) up to
    thirteen years stale on MovieLens, unlike the served model the ranker meets; a twin per
    cut-off scored higher on the validation windows (FINDINGS.md)."""

    def at(cut: pd.Timestamp) -> SequenceScores:
        content = served.space.content if served.space.content.size else None
        return twin_scorer(
            served.cfg,
            events[events["timestamp"] < cut],
            served.space.item_ids,
            content,
            f"[feature_ranker] replay sequence model at {cut} on {{events}} events in "
            "{seconds:.1f}s",
            scored=item_ids,
        )

    return at


class CatalogueVectors:
    """The catalogue under the trained item tower, as indexing writes it into Milvus: encoded
    once per run, on first use (a Ray task, on a GPU when ``use_gpu``), for the stages that
    read it (the sequence model's content vectors, the feature ranker's catalogue). On
    ml-latest-small this is 9,742 BERT passes, about two minutes on 2 CPU cores."""

    def __init__(
        self, cfg: TrainConfig, items: pd.DataFrame, tower_dir: Path, timings: dict[str, float]
    ) -> None:
        self.cfg, self.items, self.tower_dir, self.timings = cfg, items, tower_dir, timings
        self._vectors: tuple[list[str], np.ndarray] | None = None

    def vectors(self) -> tuple[list[str], np.ndarray]:
        """``(item_ids, (len(item_ids), dim) float32 unit vectors)`` in the items' order."""
        if self._vectors is None:
            item_ids = [str(i) for i in self.items["item_id"]]
            texts = item_texts(self.items)
            cpus = between_stages_cpus(self.cfg)
            gpus = 1 if self.cfg.use_gpu else 0
            encode = ray.remote(tower_vectors).options(num_cpus=cpus, num_gpus=gpus)
            with _timed(self.timings, "item_vectors"):
                vectors = ray.get(
                    encode.remote(  # type: ignore[call-arg]
                        str(self.tower_dir),
                        [texts[i] for i in item_ids],
                        self.cfg.retrieval.max_seq_len,
                        cpus,
                        self.cfg.retrieval.bf16_encoding,
                    )
                )
            seconds = self.timings["item_vectors"]
            print(f"[item_tower] catalogue vectors {vectors.shape} in {seconds:.1f}s")
            self._vectors = item_ids, vectors
        return self._vectors

    def rows(self, item_ids: Sequence[str]) -> np.ndarray:
        """The vectors of ``item_ids``, in that order (each must be in the catalogue)."""
        ids, vectors = self.vectors()
        index = {item: n for n, item in enumerate(ids)}
        return vectors[[index[str(i)] for i in item_ids]]


def between_stages_cpus(cfg: TrainConfig, per_node: list[int] | None = None) -> int:
    """CPUs (and torch threads) of a Ray task run between two stages: the catalogue's item
    vectors, hard-negative mining. With a GPU it does the work on one worker's share; on CPUs
    no stage runs beside it, so it takes every CPU the stage's workers had, as far as one
    node has them (a task runs on one node; ``per_node``: the live nodes' CPUs, default from
    Ray). One worker's share left the second core idle here: the feature ranker's 9,742
    item vectors took 175 s in ``make train`` (121 s with both cores), mining 37 s (27 s)."""
    if cfg.use_gpu:
        return cfg.cpus_per_worker
    if per_node is None:
        per_node = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    wanted = cfg.num_workers * cfg.cpus_per_worker
    if per_node:
        wanted = min(wanted, max(per_node))
    return max(cfg.cpus_per_worker, wanted)


def mine_hard_negatives(
    cfg: TrainConfig, data: PreparedData, towers_dir: Path
) -> tuple[dict[int, list[str]], list[list[str]]]:
    """Top items under the trained towers for every ranker positive (by index) and every
    ranker eval user: the ranker's hard negatives are drawn from them. Runs as a Ray task so
    it gets the cluster's GPU when ``use_gpu``."""
    k = cfg.ranker
    if k.hard_negatives <= 0 and k.eval_hard_negatives <= 0:
        return {}, [[] for _ in data.ranker_eval_users]
    q = mining_queries(cfg, data)
    cpus = between_stages_cpus(cfg)
    task = ray.remote(mine_with_towers).options(num_cpus=cpus, num_gpus=1 if cfg.use_gpu else 0)
    t0 = time.time()
    ranked: list[list[str]] = ray.get(
        task.remote(  # type: ignore[call-arg]
            str(towers_dir),
            q.user_texts,
            q.exclude,
            q.item_ids,
            q.item_texts,
            k.hard_negative_top_k,
            cfg.retrieval.max_seq_len,
            cpus,
            cfg.retrieval.bf16_encoding,
        )
    )
    n_users, n_items = len(q.user_texts), len(q.item_ids)
    print(f"[mining] {n_users} users x {n_items} items in {time.time() - t0:.1f}s")
    return dict(enumerate(ranked[: q.n_train])), list(ranked[q.n_train :])


def export(
    cfg: TrainConfig,
    data: PreparedData,
    ret_dir: Path,
    rk_dir: Path,
    info: dict[str, Any],
    timings: dict[str, float],
    started: float,
    pretrained: str,
    stages: dict[str, Path | None] | None = None,
) -> dict[str, Any]:
    """Copy the final models to ``cfg.export_dir()`` with ``metrics.json`` (every stage's
    per-epoch history), the effective config and the data report; returns the metrics.
    ``stages``: the optional stages' checkpoint directories (``sequence``,
    ``feature_ranker``), ``None`` where a stage did not run."""
    optional = {name: d for name, d in (stages or {}).items() if d is not None}
    out = cfg.export_dir()
    out.mkdir(parents=True, exist_ok=True)
    copies = [
        ("user_tower", ret_dir / "user_tower"),
        ("item_tower", ret_dir / "item_tower"),
        ("ranker", rk_dir / "ranker"),
    ]
    copies += [(name, d / name) for name, d in optional.items()]
    for name, src in copies:
        if (out / name).exists():
            shutil.rmtree(out / name)
        shutil.copytree(src, out / name)
    ret_m = json.loads((ret_dir / "metrics.json").read_text())
    rk_m = json.loads((rk_dir / "metrics.json").read_text())
    metrics: dict[str, Any] = {
        "retrieval": {
            "final": ret_m["latest"],
            "epochs": ret_m["history"],
            "checkpoint": str(ret_dir),
        },
        "ranker": {"final": rk_m["latest"], "epochs": rk_m["history"], "checkpoint": str(rk_dir)},
        "data": info,
        "timing_seconds": {
            **{k: round(v, 1) for k, v in timings.items()},
            "total": round(time.time() - started, 1),
        },
        "pretrained_model": pretrained,
    }
    for name, d in optional.items():
        stage_m = json.loads((d / "metrics.json").read_text())
        metrics[name] = {
            "final": stage_m["latest"],
            "epochs": stage_m["history"],
            "checkpoint": str(d),
        }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
    (out / "train_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (out / "data_report.txt").write_text(data.dataset.report.summary(max_rows=1000) + "\n")
    print(f"[done] exported to {out} in {time.time() - started:.1f}s")
    print(f"[done] retrieval: {_short(ret_m['latest'])}")
    print(f"[done] ranker:    {_short(rk_m['latest'])}")
    for name in optional:
        print(f"[done] {name}: {_short(metrics[name]['final'])}")
    return metrics


# --------------------------------------------------------------------------------------------
# Ray and run directories


def init_ray(cfg: TrainConfig) -> None:
    """Connect to ``ray_address`` / ``RAY_ADDRESS`` or start a local Ray, with the workers'
    environment set so they never download and print once."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    set_offline()
    if ray.is_initialized():
        return
    env = {
        **OFFLINE_ENV,
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_TRAIN_V2_ENABLED": "1",
        # print() in workers reaches the driver once (the patch would log it a second time)
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    if cfg.ray_address:
        os.environ["RAY_ADDRESS"] = cfg.ray_address
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": True}
    if not os.environ.get("RAY_ADDRESS"):
        kwargs["num_gpus"] = None if cfg.use_gpu else 0
        if cfg.object_store_memory:
            kwargs["object_store_memory"] = int(cfg.object_store_memory)
    connect(num_cpus=cfg.num_cpus, **kwargs)


def _previous_run(run_dir: Path, task: Task[Any, Any], resume: bool) -> tuple[Path | None, bool]:
    """The checkpoint a resumed stage starts from (``None``: from scratch) and whether it
    already finished the stage; without ``resume`` the previous run is deleted so that Ray
    does not restore it."""
    if not resume:
        if run_dir.exists():
            print(f"[{task.name}] removing previous run {run_dir} (pass --resume to continue it)")
            shutil.rmtree(run_dir)
        return None, False
    found = latest_checkpoint(run_dir)
    if found is None:
        return None, False
    ckpt_dir, epoch = found
    if epoch + 1 >= task.cfg.run_epochs:
        print(f"[{task.name}] already finished ({epoch + 1} epochs) at {ckpt_dir}; reusing it")
        return ckpt_dir, True
    print(f"[{task.name}] resuming after epoch {epoch + 1} from {ckpt_dir}")
    return ckpt_dir, False


def _finished(cfg: TrainConfig, task: Task[Any, Any]) -> bool:
    found = latest_checkpoint(cfg.run_dir(task.name))
    return found is not None and found[1] + 1 >= task.cfg.run_epochs


def _local_checkpoint(cfg: TrainConfig, stage: str, result: Result) -> Path:
    """The final checkpoint as a local directory (downloaded when storage is remote)."""
    if result.checkpoint is None:
        raise RuntimeError(f"{stage}: training produced no checkpoint")
    path = Path(result.checkpoint.path)
    if not path.exists():
        local = Path(cfg.output_dir or f"runs/{cfg.name}").absolute() / ".download"
        local.mkdir(parents=True, exist_ok=True)
        result.checkpoint.to_directory(str(local / f"{stage}-final"))
        path = local / f"{stage}-final"
    return path


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    t0 = time.time()
    yield
    timings[key] = time.time() - t0


def _print(line: str) -> None:
    print(line, flush=True)


def _short(m: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(REPO_ROOT / "training/configs/local.yaml"))
    p.add_argument("--resume", action="store_true", help="continue the previous run")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. retrieval.epochs=1",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = load_config(args.config, args.overrides)
    run(cfg, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
