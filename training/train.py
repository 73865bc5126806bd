"""Train the two-tower retriever, then the CTR ranker, on Ray Train; export the results.

Usage::

    python -m training.train --config training/configs/local.yaml [--resume] \\
        [--set retrieval.epochs=1 --set ranker.max_examples=100 ...]

    # on a Ray cluster with GPUs (the driver connects with ray.init(address="auto")):
    ray job submit --working-dir . -- python -m training.train --config training/configs/gpu.yaml

Pipeline:

1. load the dataset (:func:`training.data.load_dataset`, report printed), split it by time
   (:func:`training.data.split.time_split`), build training examples from the train split
   and validation users from the test split (:mod:`training.data.examples`);
2. retrieval: ``TorchTrainer(retrieval_loop)`` with ``ScalingConfig(num_workers, use_gpu)``,
   ``RunConfig(storage_path, name="<name>-retrieval", CheckpointConfig, FailureConfig)``;
   Recall@10 per epoch on the validation users;
3. hard negatives: the trained towers rank a candidate pool for every ranker example (a Ray
   task, on a GPU when ``use_gpu``); each positive gets random + hard negatives;
4. ranker: ``TorchTrainer(ranker_loop)`` (``<name>-ranker``); AUC and log-loss per epoch;
5. export to ``output_dir`` (default ``<storage_path>/<name>/final``): ``user_tower/``,
   ``item_tower/``, ``ranker/``, ``metrics.json`` (per-epoch history of both stages, data
   counts, timings), ``train_config.yaml`` and ``data_report.txt``.

Resume: without ``--resume`` the two Ray run directories are deleted and training starts
from the pretrained model. With ``--resume`` a finished stage is reused as is and an
unfinished one continues after its latest checkpoint (Ray Train restores the run with the
same name and storage path, and the latest checkpoint is also passed to the loop as
``resume_from``). Inside one run, a failed worker group is restarted from the latest
checkpoint up to ``max_failures`` times.
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
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from training.models.pretrained import OFFLINE_ENV, resolve_pretrained, set_offline
from training.ray_cluster import connect

log = logging.getLogger("training.train")

REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# configuration


@dataclass
class StageConfig:
    epochs: int = 1
    batch_size: int = 16
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_seq_len: int = 64
    max_examples: int | None = 400
    eval_users: int | None = 100
    eval_batch_size: int = 64
    eval_before_training: bool = False
    log_every: int = 5
    #: test hook: raise once after this epoch to exercise FailureConfig + resume
    fail_after_epoch: int | None = None


@dataclass
class RetrievalConfig(StageConfig):
    shared_weights: bool = True
    temperature: float = 0.05
    learn_temperature: bool = True
    k: int = 10
    #: relevant items per validation user: their next N unseen positives after the split
    eval_relevant_per_user: int | None = 10
    #: items ranked at validation: relevant items + a random sample up to this size
    #: (``null`` = the whole catalogue)
    eval_candidates: int | None = 1000


@dataclass
class RankerConfig(StageConfig):
    max_seq_len: int = 128
    max_examples: int | None = 200  # positives; each gets the negatives below
    random_negatives: int = 1
    hard_negatives: int = 1
    hard_negative_top_k: int = 50
    mining_candidates: int | None = 2000
    eval_users: int | None = 50
    eval_positives_per_user: int = 2
    eval_random_negatives: int = 2
    eval_hard_negatives: int = 2
    balance_classes: bool = False


@dataclass
class TrainConfig:
    name: str = "local"
    data_dir: str = "third_party/movielens/ml-latest-small"
    pretrained_model: str = ""  # "" = core.config pretrained_model, else bundled MiniLM
    storage_path: str = "runs"
    output_dir: str | None = None  # default <storage_path>/<name>/final
    seed: int = 0
    # time split for validation: leave_last_n per user, else cutoff, else quantile
    split_quantile: float | None = 0.8
    split_cutoff: str | None = None
    split_leave_last_n: int | None = None
    history_len: int = 20
    max_chars: int = 1000
    # Ray
    ray_address: str | None = None  # None: RAY_ADDRESS or a local Ray with num_cpus
    num_cpus: int | None = 2
    object_store_memory: int | None = None
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_failures: int = 1
    checkpoints_to_keep: int = 2
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    ranker: RankerConfig = field(default_factory=RankerConfig)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        ret = _build(RetrievalConfig, d.pop("retrieval", None) or {}, "retrieval")
        rk = _build(RankerConfig, d.pop("ranker", None) or {}, "ranker")
        cfg = _build(cls, d, "")
        cfg.retrieval, cfg.ranker = ret, rk
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """YAML reads ``1e-3`` as a string and ``5`` as an int: cast to the field's type."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None:
        if hint is not None and type(None) not in typing.get_args(hint):
            raise ValueError(f"config key {key!r} must not be null")
        return None
    target = args[0] if args else hint
    if target is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config key {key!r} must be true/false, got {value!r}")
        return value
    if target in (int, float, str):
        try:
            out = target(value)
        except (TypeError, ValueError):
            msg = f"config key {key!r}: cannot read {value!r} as {target.__name__}"
            raise ValueError(msg) from None
        if target is int and isinstance(value, float) and value != out:
            raise ValueError(f"config key {key!r} must be an integer, got {value!r}")
        return out
    return value


def _build(cls: Any, d: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} in {where or 'top level'}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in d.items()})


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file (or defaults) plus ``key=value`` / ``section.key=value`` overrides (values
    parsed as YAML)."""
    raw: dict[str, Any] = {}
    if path:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    for ov in overrides or []:
        key, sep, value = ov.partition("=")
        if not sep:
            raise ValueError(f"override {ov!r} is not key=value")
        target = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            target = target.setdefault(p, {})
        target[parts[-1]] = yaml.safe_load(value)
    return TrainConfig.from_dict(raw)


def _resolve_path(p: str) -> Path:
    path = Path(p).expanduser()
    if path.is_absolute() or path.exists() or "://" in p:
        return path.absolute() if "://" not in p else path
    alt = REPO_ROOT / path
    return alt if alt.exists() else path.absolute()


def _pretrained(cfg: TrainConfig) -> str:
    name = cfg.pretrained_model
    if not name:
        try:
            from core.config import get_settings

            name = get_settings().pretrained_model
        except Exception:  # services not importable: fall back to the bundled model
            name = ""
    return resolve_pretrained(name)


# --------------------------------------------------------------------------------------------
# data


def prepare_data(cfg: TrainConfig) -> dict[str, Any]:
    """Load, split and turn the dataset into examples (no torch)."""
    from training.data import load_dataset
    from training.data.examples import (
        TextBuilder,
        candidate_pool,
        eval_users,
        retrieval_examples,
        user_positive_sets,
    )
    from training.data.split import time_split

    t0 = time.time()
    ds = load_dataset(_resolve_path(cfg.data_dir))
    print(ds.report.summary(), flush=True)
    train_ev, test_ev = time_split(
        ds.events,
        cutoff=cfg.split_cutoff,
        quantile=cfg.split_quantile,
        leave_last_n=cfg.split_leave_last_n,
    )
    builder = TextBuilder(ds.items, history_len=cfg.history_len, max_chars=cfg.max_chars)
    r, k = cfg.retrieval, cfg.ranker
    ret_train = retrieval_examples(train_ev, builder, max_examples=r.max_examples, seed=cfg.seed)
    ret_users = eval_users(
        train_ev,
        test_ev,
        builder,
        max_users=r.eval_users,
        max_relevant=r.eval_relevant_per_user,
        seed=cfg.seed,
    )
    relevant = [i for u in ret_users for i in u["relevant"]]
    pool = candidate_pool(builder.item_ids, relevant, r.eval_candidates, seed=cfg.seed)
    rk_pos = retrieval_examples(train_ev, builder, max_examples=k.max_examples, seed=cfg.seed + 1)
    rk_users = eval_users(
        train_ev, test_ev, builder, max_users=k.eval_users, max_relevant=None, seed=cfg.seed + 1
    )
    if not ret_train:
        raise ValueError("no retrieval training examples: is the training split empty?")
    info = {
        "events": len(ds.events),
        "items": len(ds.items),
        "train_events": len(train_ev),
        "test_events": len(test_ev),
        "split_train_max_ts": str(train_ev["timestamp"].max()) if len(train_ev) else None,
        "split_test_min_ts": str(test_ev["timestamp"].min()) if len(test_ev) else None,
        "retrieval_examples": len(ret_train),
        "retrieval_eval_users": len(ret_users),
        "retrieval_eval_candidates": len(pool),
        "ranker_positives": len(rk_pos),
        "ranker_eval_users": len(rk_users),
        "load_report_counts": dict(ds.report.counts),
        "malformed_rows": len(ds.report.malformed),
        "prepare_seconds": round(time.time() - t0, 2),
    }
    print(f"[data] {json.dumps(info)}", flush=True)
    return {
        "dataset": ds,
        "builder": builder,
        "train_positives": user_positive_sets(train_ev),
        "all_positives": user_positive_sets(ds.events),
        "retrieval_train": ret_train,
        "retrieval_eval": {
            "users": ret_users,
            "item_ids": pool,
            "item_texts": [builder.item(i) for i in pool],
        },
        "ranker_positives": rk_pos,
        "ranker_eval_users": rk_users,
        "info": info,
    }


# --------------------------------------------------------------------------------------------
# Ray


def init_ray(cfg: TrainConfig) -> None:
    import ray

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


def _storage(cfg: TrainConfig) -> str:
    s = cfg.storage_path
    return s if "://" in s else str(_resolve_path(s))


def _run_dir(cfg: TrainConfig, stage: str) -> Path:
    return Path(_storage(cfg)) / f"{cfg.name}-{stage}"


def latest_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    """The checkpoint directory with the highest completed epoch under a Ray run dir."""
    best: tuple[Path, int] | None = None
    if not run_dir.is_dir():
        return None
    for d in run_dir.glob("checkpoint_*"):
        mf = d / "metrics.json"
        if not (d / "train_state.pt").exists() or not mf.exists():
            continue
        try:
            epoch = int(json.loads(mf.read_text())["latest"]["epoch"])
        except (ValueError, KeyError, json.JSONDecodeError):
            continue
        if best is None or epoch > best[1]:
            best = (d, epoch)
    return best


def _stage_finished(cfg: TrainConfig, stage: str) -> bool:
    found = latest_checkpoint(_run_dir(cfg, stage))
    return found is not None and found[1] + 1 >= getattr(cfg, stage).epochs


def run_stage(
    cfg: TrainConfig,
    stage: str,
    loop: Any,
    loop_config: dict[str, Any],
    *,
    resume: bool,
) -> Path:
    """One TorchTrainer run; returns the local directory of its final checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    stage_cfg: StageConfig = getattr(cfg, stage)
    run_dir = _run_dir(cfg, stage)
    if not resume and run_dir.exists():
        print(f"[{stage}] removing previous run {run_dir} (pass --resume to continue it)")
        shutil.rmtree(run_dir)
    if resume:
        found = latest_checkpoint(run_dir)
        if found is not None:
            ckpt_dir, epoch = found
            if epoch + 1 >= stage_cfg.epochs:
                print(f"[{stage}] already finished ({epoch + 1} epochs) at {ckpt_dir}; reusing it")
                return ckpt_dir
            print(f"[{stage}] resuming after epoch {epoch + 1} from {ckpt_dir}")
            loop_config["resume_from"] = str(ckpt_dir)
    loop_config["fail_marker"] = str(run_dir.parent / f".{run_dir.name}.failed_once")
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={
                "CPU": cfg.cpus_per_worker,
                **({"GPU": 1} if cfg.use_gpu else {}),
            },
        ),
        run_config=RunConfig(
            name=run_dir.name,
            storage_path=_storage(cfg),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    t0 = time.time()
    result = trainer.fit()
    print(f"[{stage}] finished in {time.time() - t0:.1f}s", flush=True)
    if result.checkpoint is None:
        raise RuntimeError(f"{stage}: training produced no checkpoint")
    path = Path(result.checkpoint.path)
    if not path.exists():  # remote storage: bring it here
        local = Path(_storage_local_tmp(cfg)) / f"{stage}-final"
        result.checkpoint.to_directory(str(local))
        path = local
    return path


def _storage_local_tmp(cfg: TrainConfig) -> str:
    d = Path(cfg.output_dir or f"runs/{cfg.name}").absolute() / ".download"
    d.mkdir(parents=True, exist_ok=True)
    return str(d)


def _stage_loop_config(cfg: TrainConfig, stage: str, pretrained: str) -> dict[str, Any]:
    sc = dataclasses.asdict(getattr(cfg, stage))
    sc.update(
        seed=cfg.seed,
        pretrained=pretrained,
        torch_threads=cfg.cpus_per_worker,
    )
    return sc


def mine_hard_negatives(
    cfg: TrainConfig,
    towers_dir: Path,
    user_texts: list[str],
    exclude: list[set[str]],
    item_ids: list[str],
    item_texts: list[str],
    top_k: int,
) -> list[list[str]]:
    """Top-``top_k`` items per user under the trained towers, run as a Ray task."""
    import ray

    from training.models.loops import mine_with_towers

    task = ray.remote(mine_with_towers).options(
        num_cpus=cfg.cpus_per_worker, num_gpus=1 if cfg.use_gpu else 0
    )
    t0 = time.time()
    out = ray.get(
        task.remote(  # type: ignore[call-arg]
            str(towers_dir),
            user_texts,
            exclude,
            item_ids,
            item_texts,
            top_k,
            cfg.retrieval.max_seq_len,
            cfg.cpus_per_worker,
        )
    )
    print(f"[mining] {len(user_texts)} users x {len(item_ids)} items in {time.time() - t0:.1f}s")
    return list(out)


# --------------------------------------------------------------------------------------------
# pipeline


def run(cfg: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """The whole pipeline; returns the final ``metrics.json`` content."""
    import ray

    from training.data.examples import candidate_pool, ranker_examples
    from training.models.loops import ranker_loop, retrieval_loop

    t_start = time.time()
    pretrained = _pretrained(cfg)
    print(f"[config] pretrained model: {pretrained}", flush=True)
    data = prepare_data(cfg)
    builder = data["builder"]
    init_ray(cfg)

    # 1. retrieval
    rcfg = _stage_loop_config(cfg, "retrieval", pretrained)
    rcfg["train_examples"] = ray.put(data["retrieval_train"])
    rcfg["eval_data"] = ray.put(data["retrieval_eval"])
    t0 = time.time()
    ret_dir = run_stage(cfg, "retrieval", retrieval_loop, rcfg, resume=resume)
    t_ret = time.time() - t0

    # 2. hard negatives from the trained towers
    k = cfg.ranker
    pos = data["ranker_positives"]
    eval_u = data["ranker_eval_users"]
    must = [i for u in eval_u for i in u["relevant"]]
    pool = candidate_pool(builder.item_ids, must, k.mining_candidates, seed=cfg.seed + 2)
    pool_texts = [builder.item(i) for i in pool]
    rk_done = resume and _stage_finished(cfg, "ranker")
    need_hard = (k.hard_negatives > 0 or k.eval_hard_negatives > 0) and not rk_done
    t0 = time.time()
    if need_hard:
        excl_train = [
            data["train_positives"].get(e["user_id"], set()) | {e["item_id"]} for e in pos
        ]
        excl_eval = [set(u["seen"]) | set(u["relevant"]) for u in eval_u]
        ranked = mine_hard_negatives(
            cfg,
            ret_dir,
            [e["user_text"] for e in pos] + [u["user_text"] for u in eval_u],
            excl_train + excl_eval,
            pool,
            pool_texts,
            k.hard_negative_top_k,
        )
        hard_train = dict(enumerate(ranked[: len(pos)]))
        hard_eval = ranked[len(pos) :]
    else:
        hard_train, hard_eval = {}, [[] for _ in eval_u]
    t_mine = time.time() - t0
    train_pairs: list[dict[str, Any]] = []
    eval_pairs: list[dict[str, Any]] = []
    if not rk_done:  # a finished ranker is reused by run_stage: no pairs needed
        train_pairs = ranker_examples(
            pos,
            builder,
            user_positives=data["train_positives"],
            hard_candidates=hard_train,
            random_negatives=k.random_negatives,
            hard_negatives=k.hard_negatives,
            seed=cfg.seed,
        )
        eval_pairs = _ranker_eval_pairs(data, eval_u, hard_eval, cfg)

    # 3. ranker
    kcfg = _stage_loop_config(cfg, "ranker", pretrained)
    kcfg["train_examples"] = ray.put(train_pairs)
    kcfg["eval_data"] = ray.put(eval_pairs)
    t0 = time.time()
    rk_dir = run_stage(cfg, "ranker", ranker_loop, kcfg, resume=resume)
    t_rank = time.time() - t0

    # 4. export
    out = Path(cfg.output_dir) if cfg.output_dir else Path(_storage(cfg)) / cfg.name / "final"
    if "://" in str(out):
        raise ValueError("output_dir must be a local path")
    out = out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    for name, src in (
        ("user_tower", ret_dir / "user_tower"),
        ("item_tower", ret_dir / "item_tower"),
        ("ranker", rk_dir / "ranker"),
    ):
        if (out / name).exists():
            shutil.rmtree(out / name)
        shutil.copytree(src, out / name)
    ret_m = json.loads((ret_dir / "metrics.json").read_text())
    rk_m = json.loads((rk_dir / "metrics.json").read_text())
    info = dict(data["info"])
    if not rk_done:
        info.update(ranker_train_pairs=len(train_pairs), ranker_eval_pairs=len(eval_pairs))
    metrics = {
        "retrieval": {
            "final": ret_m["latest"],
            "epochs": ret_m["history"],
            "checkpoint": str(ret_dir),
        },
        "ranker": {"final": rk_m["latest"], "epochs": rk_m["history"], "checkpoint": str(rk_dir)},
        "data": info,
        "timing_seconds": {
            "retrieval": round(t_ret, 1),
            "mining": round(t_mine, 1),
            "ranker": round(t_rank, 1),
            "total": round(time.time() - t_start, 1),
        },
        "pretrained_model": pretrained,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
    (out / "train_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (out / "data_report.txt").write_text(data["dataset"].report.summary(max_rows=1000) + "\n")
    print(f"[done] exported to {out} in {time.time() - t_start:.1f}s")
    print(f"[done] retrieval: {_short(ret_m['latest'])}")
    print(f"[done] ranker:    {_short(rk_m['latest'])}")
    return metrics


def _short(m: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())


def _ranker_eval_pairs(
    data: dict[str, Any], users: list[dict[str, Any]], hard: list[list[str]], cfg: TrainConfig
) -> list[dict[str, Any]]:
    import random

    k = cfg.ranker
    builder = data["builder"]
    rng = random.Random(cfg.seed + 3)
    pairs: list[dict[str, Any]] = []
    for u, hard_u in zip(users, hard, strict=True):
        banned = (
            set(u["seen"]) | set(u["relevant"]) | data["all_positives"].get(u["user_id"], set())
        )
        rel = u["relevant"]
        for iid in rng.sample(rel, min(k.eval_positives_per_user, len(rel))):
            pairs.append(
                {
                    "user_text": u["user_text"],
                    "item_text": builder.item(iid),
                    "label": 1.0,
                    "kind": "pos",
                }
            )
        hard_ok = [i for i in hard_u if i not in banned]
        chosen = rng.sample(hard_ok, min(k.eval_hard_negatives, len(hard_ok)))
        for iid in chosen:
            pairs.append(
                {
                    "user_text": u["user_text"],
                    "item_text": builder.item(iid),
                    "label": 0.0,
                    "kind": "hard",
                }
            )
        n = 0
        for _ in range(100 * max(1, k.eval_random_negatives)):
            if n >= k.eval_random_negatives:
                break
            iid = builder.item_ids[rng.randrange(len(builder.item_ids))]
            if iid in banned or iid in chosen:
                continue
            chosen.append(iid)
            n += 1
            pairs.append(
                {
                    "user_text": u["user_text"],
                    "item_text": builder.item(iid),
                    "label": 0.0,
                    "kind": "random",
                }
            )
    return pairs


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
