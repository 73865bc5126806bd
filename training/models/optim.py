"""The optimisation every training path shares: AdamW with a linear warm-up/decay over the
run's steps, the step with the gradient norm clipped to 1, and the rows a data loader reads.
The Ray loop (:mod:`training.loop`), the in-process loop (:mod:`training.steps`) and the
offline evaluation's sequence model (:func:`training.models.sequence.train_sequence_model`)
all step through these, so a model trained either way follows the same schedule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from training.config import StageConfig
from training.models.ranker import adamw


def schedule(
    model: torch.nn.Module, stage: StageConfig, total: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its linear warm-up/decay over ``total`` steps."""
    opt = adamw(model, stage.lr, stage.weight_decay)
    warmup = int(stage.warmup_ratio * total)

    def linear(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, linear)


def optimizer_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LambdaLR,
    loss: torch.Tensor,
) -> None:
    """Backward, clip the global gradient norm to 1, step the optimizer and the schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()


class ListDataset(torch.utils.data.Dataset[Any]):
    """Rows, as a map-style dataset."""

    def __init__(self, rows: Sequence[Any]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Any:
        return self.rows[i]
