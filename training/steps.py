"""Training without Ray: the workers' seeds and a plain PyTorch loop over a task's rows on
one device, with the optimizer, schedule and step every stage shares
(:mod:`training.models.optim`).

The Ray Train loop (:mod:`training.loop`) seeds its workers here;
:func:`train_epochs` runs the same task, model, loss and step in this process, on the CPU for
the analyses that train many small models (:func:`fit_in_process`) or on a GPU where Ray is
not installed (``python -m bench.gpu_train``). Nothing here imports Ray.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from training.models.optim import ListDataset, optimizer_step, schedule
from training.pretrained import load_tokenizer, set_offline
from training.reproducible import deterministic
from training.tasks.base import ModelT, Row, Task

#: called after each epoch with (epoch, seconds, its steps, the mean loss of its steps)
EpochObserver = Callable[[int, float, int, float], None]


def seed_worker(seed: int, threads: int, rank: int) -> None:
    """Offline Hugging Face, the worker's CPU share, and seeds: the same weight init on every
    rank (DDP also broadcasts rank 0's), different Python/NumPy draws per rank."""
    set_offline()
    if threads > 0:
        torch.set_num_threads(threads)
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed)


def to_device(batch: Any, device: torch.device) -> Any:
    """A collated batch (tensors, or dicts and lists of them) on ``device``, as Ray's data
    loader moves it to a worker's."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def train_epochs(
    task: Task[ModelT, Any],
    rows: Sequence[Row],
    seed: int,
    device: torch.device | str = "cpu",
    epochs: int | None = None,
    on_epoch: EpochObserver | None = None,
    pretrained: str = "",
) -> ModelT:
    """``task``'s model trained in this process on ``device``, one worker, with the loop's
    optimizer, schedule, clipping and the stage's epochs (``epochs`` stops earlier, with the
    schedule of the whole run); no Ray, no checkpoints. ``pretrained``: the BERT directory
    a text stage starts from and tokenizes with. ``on_epoch`` sees each epoch's time, the
    device synchronised first, so that a GPU's queued work is counted."""
    device = torch.device(device)
    seed_worker(seed, torch.get_num_threads(), 0)
    model = task.build_model(pretrained).to(device)
    tokenizer = load_tokenizer(pretrained) if pretrained else None
    stage = task.cfg
    loader = DataLoader(
        ListDataset(rows),
        batch_size=stage.batch_size,
        shuffle=True,
        collate_fn=task.collator(tokenizer),
        generator=torch.Generator().manual_seed(seed),
    )
    opt, sched = schedule(model, stage, len(loader) * stage.epochs)
    task.start(rows, device)
    model.train()
    for epoch in range(stage.run_epochs if epochs is None else min(epochs, stage.run_epochs)):
        t0, losses = time.perf_counter(), []
        for batch in loader:
            loss = task.loss(model, to_device(batch, device))
            optimizer_step(model, opt, sched, loss)
            if on_epoch is not None:
                losses.append(loss.detach())
        if on_epoch is not None:
            mean = float(torch.stack(losses).mean()) if losses else float("nan")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            on_epoch(epoch, time.perf_counter() - t0, len(losses), mean)
    model.eval()
    return model


@deterministic()
def fit_in_process(task: Task[ModelT, Any], rows: Sequence[Row], seed: int) -> ModelT:
    """``task``'s model trained on this process's CPU (:func:`train_epochs`): for analyses
    that train many small models, such as :mod:`training.evaluation.ranker_validation`, and
    the release choice; with PyTorch's deterministic kernels (:mod:`training.reproducible`)."""
    return train_epochs(task, rows, seed)
