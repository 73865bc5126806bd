"""The one Ray Train loop: ``train_func`` runs on every worker of both stages.

Shaped like Ray Train's PyTorch guide; what differs between the retriever and the ranker
comes from ``config["task"]`` (:mod:`training.tasks`):

* the model is wrapped with ``ray.train.torch.prepare_model`` (DDP) and the data with
  ``ray.train.torch.prepare_data_loader`` (adds a ``DistributedSampler``);
* AdamW with linear warm-up and decay over every step of the run, gradient norm clipped to 1
  (:mod:`training.models.optim`; :mod:`training.steps` also trains a stage in one process,
  without Ray);
* after every epoch all workers call ``ray.train.report(metrics, checkpoint=...)``; rank 0
  evaluates, writes a checkpoint directory (the task's model files, ``train_state.pt`` with
  optimizer/scheduler/epoch/history, and ``metrics.json``) and attaches it; it also logs the
  epoch's metrics to the stage's MLflow run (Ray's ``setup_mlflow``, :mod:`training.tracking`);
* on start, ``ray.train.get_checkpoint()`` (set by Ray after a worker failure with
  ``FailureConfig(max_failures)``, or when a run with the same name/storage is restarted) or
  ``config["resume_from"]`` restores weights, optimizer, scheduler and epoch, so training
  continues with the next epoch.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from torch.utils.data import DataLoader

from training.config import StageConfig
from training.models.optim import ListDataset, optimizer_step, schedule
from training.pretrained import load_tokenizer
from training.steps import seed_worker
from training.tasks.base import Row, Task
from training.tracking import worker_logger

STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class LoopConfig:
    """What ``train_func`` gets besides the stage's own settings (``task.cfg``); passed to
    Ray as ``train_loop_config=loop_config.to_dict()``."""

    task: Task[Any, Any]
    pretrained: str  # BERT directory: fresh models and the tokenizer
    seed: int
    torch_threads: int
    train_examples: Any  # ObjectRef of the training rows: put once, shared by the workers
    eval_data: Any  # ObjectRef of the task's evaluation data, fetched by rank 0 only
    resume_from: str | None  # checkpoint to continue when Ray has none of its own
    fail_marker: str  # see _maybe_fail
    tracking: dict[str, Any] | None = None  # the stage's MLflow run (training.tracking)

    def to_dict(self) -> dict[str, Any]:
        """Shallow, unlike ``dataclasses.asdict`` (which would turn the task into a dict)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def train_func(config: dict[str, Any]) -> None:
    """Train ``config["task"]`` on this worker (see the module docstring)."""
    c = LoopConfig(**config)
    task, stage = c.task, c.task.cfg
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_worker(c.seed, c.torch_threads, rank)
    tracker = worker_logger(c.tracking, rank)  # Ray's setup_mlflow on rank 0
    device = ray.train.torch.get_device()
    tokenizer = load_tokenizer(c.pretrained)
    restored, state = _resume(task, c.resume_from, rank)
    if restored is None:
        restored = task.build_model(c.pretrained)
    ddp = ray.train.torch.prepare_model(restored)
    model = _unwrap(ddp)
    rows = _ray_get(c.train_examples)
    loader = _loader(rows, stage.batch_size, world, task.collator(tokenizer))
    steps, epochs = len(loader), stage.epochs
    last = stage.run_epochs  # the schedule spans ``epochs``; early stopping may end sooner
    opt, sched, history, start = _optimizer(model, stage, steps, state)
    eval_data = _ray_get(c.eval_data) if rank == 0 else None
    described = task.start(rows, device)

    if rank == 0 and start == 0 and stage.eval_before_training and eval_data:
        base = task.evaluate(model, tokenizer, eval_data, device)
        _log(rank, f"[{task.name}] before training: {base}")
        history.append({"epoch": -1, **base})
        tracker.log_epoch(history[-1])
    _log(rank, f"[{task.name}] {described}, {world} workers, {steps} steps/epoch/worker")
    for epoch in range(start, last):
        _set_epoch(loader, epoch)
        ddp.train()
        losses: list[float] = []
        t0 = time.time()
        for step, batch in enumerate(loader, 1):
            loss = task.loss(ddp, batch)
            optimizer_step(ddp, opt, sched, loss)
            losses.append(float(loss.item()))
            if step % stage.log_every == 0 or step == steps:
                _log(
                    rank,
                    f"[{task.name}] epoch {epoch + 1}/{epochs} step {step}/{steps} "
                    + _fmt(
                        {
                            "loss": losses[-1],
                            "lr": sched.get_last_lr()[0],
                            **task.progress(model),
                            "s_per_step": (time.time() - t0) / step,
                        }
                    ),
                )
        metrics = _epoch_metrics(epoch, losses, world, t0, task.progress(model))
        if rank == 0:
            if eval_data:
                metrics.update(task.evaluate(model, tokenizer, eval_data, device))
            history.append(dict(metrics))
            tracker.log_epoch(metrics)
            _log(rank, f"[{task.name}] epoch {epoch + 1}/{epochs} " + _fmt(metrics))
            with tempfile.TemporaryDirectory(prefix="ckpt-", ignore_cleanup_errors=True) as tmp:
                task.save_model(model, tokenizer, Path(tmp))
                _save_state(Path(tmp), epoch, opt, sched, metrics, history)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics, checkpoint=None)
        _maybe_fail(stage, c.fail_marker, epoch, rank)
    tracker.end()


def latest_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    """The checkpoint directory with the highest completed epoch under a Ray run dir."""
    best: tuple[Path, int] | None = None
    if not run_dir.is_dir():
        return None
    for d in run_dir.glob("checkpoint_*"):
        mf = d / METRICS_FILE
        if not (d / STATE_FILE).exists() or not mf.exists():
            continue
        try:
            epoch = int(json.loads(mf.read_text())["latest"]["epoch"])
        except (ValueError, KeyError, json.JSONDecodeError):
            continue
        if best is None or epoch > best[1]:
            best = (d, epoch)
    return best


# --------------------------------------------------------------------------------------------
# set-up and resume


def _resume(
    task: Task[Any, Any], resume_from: str | None, rank: int
) -> tuple[Any, dict[str, Any] | None]:
    """The model and training state to continue from, or ``(None, None)`` for a fresh start.
    Ray's checkpoint (failure restart / restored run) wins over ``resume_from``."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        where: AbstractContextManager[str] = ckpt.as_directory()
    elif resume_from:
        where = nullcontext(resume_from)
    else:
        return None, None
    with where as d:
        model = task.load_model(Path(d))
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
    _log(rank, f"[{task.name}] resumed from checkpoint after epoch {state['epoch'] + 1}")
    return model, state


def _optimizer(
    model: torch.nn.Module, stage: StageConfig, steps: int, state: dict[str, Any] | None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, list[dict[str, Any]], int]:
    """AdamW with linear warm-up/decay over every step of the run; restored from ``state``
    when resuming. Returns (optimizer, schedule, metrics history, first epoch to run)."""
    opt, sched = schedule(model, stage, steps * stage.epochs)
    if state is None:
        return opt, sched, [], 0
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return opt, sched, list(state["history"]), int(state["epoch"]) + 1


# --------------------------------------------------------------------------------------------
# data


def _loader(
    rows: Sequence[Row], batch_size: int, world: int, collate: Callable[[Sequence[Row]], Any]
) -> DataLoader[Row]:
    """Shuffled batches of this worker's shard; the last partial batch is dropped only when
    there are enough rows that dropping it cannot leave a worker with nothing."""
    drop_last = len(rows) >= 2 * batch_size * world
    loader = DataLoader(
        ListDataset(rows),
        batch_size=batch_size,
        shuffle=True,
        collate_fn=collate,
        drop_last=drop_last,
    )
    return ray.train.torch.prepare_data_loader(loader)


def _set_epoch(loader: DataLoader[Row], epoch: int) -> None:
    """A new shuffle per epoch (the ``DistributedSampler`` is seeded by the epoch)."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)  # type: ignore[union-attr]


def _ray_get(x: Any) -> Any:
    return ray.get(x) if isinstance(x, ray.ObjectRef) else x


# --------------------------------------------------------------------------------------------
# steps, metrics, checkpoints


def _epoch_metrics(
    epoch: int, losses: list[float], world: int, t0: float, extra: dict[str, float]
) -> dict[str, Any]:
    """Training-loss summary of one epoch, averaged over workers (every worker calls this,
    since it is a collective)."""
    return {
        "epoch": epoch,
        "train_loss": _mean_across_workers(float(np.mean(losses)) if losses else math.nan, world),
        "train_loss_first_step": _mean_across_workers(losses[0] if losses else math.nan, world),
        "train_loss_last_step": _mean_across_workers(losses[-1] if losses else math.nan, world),
        **extra,
        "epoch_seconds": time.time() - t0,
    }


def _mean_across_workers(value: float, world: int) -> float:
    if world <= 1 or not torch.distributed.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return float(t.item()) / world


def _save_state(
    d: Path,
    epoch: int,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LambdaLR,
    metrics: dict[str, Any],
    history: list[dict[str, Any]],
) -> None:
    """What resuming needs besides the weights (``train_state.pt``: epoch, optimizer,
    scheduler, metrics history) and ``metrics.json`` (``{"latest": ..., "history": [...]}``),
    which :func:`latest_checkpoint` and the export read."""
    state = {
        "epoch": epoch,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "history": list(history),
    }
    torch.save(state, d / STATE_FILE)
    doc = {"latest": metrics, "history": history}
    (d / METRICS_FILE).write_text(json.dumps(doc, indent=2, default=float) + "\n")


def _maybe_fail(stage: StageConfig, marker: str, epoch: int, rank: int) -> None:
    """Test hook: raise once after ``fail_after_epoch`` (the marker file makes it once), so
    tests see Ray restart the worker group from the latest checkpoint."""
    fail_at = stage.fail_after_epoch
    if fail_at is None or epoch != int(fail_at) or not marker:
        return
    if rank == 0 and not os.path.exists(marker):
        Path(marker).write_text(f"failed after epoch {epoch}\n")
        raise RuntimeError(f"injected failure after epoch {epoch} (fail_after_epoch)")


def _unwrap(model: torch.nn.Module) -> Any:
    """The model inside DDP (evaluation and saving use it, not the wrapper)."""
    return model.module if hasattr(model, "module") else model


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


def _fmt(metrics: dict[str, Any]) -> str:
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
    )
