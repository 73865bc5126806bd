"""The contract between the one Ray Train loop (:mod:`training.loop`) and a model.

The loop owns everything the stages share (set-up, resume, optimizer and schedule, DDP,
the epoch loop, reporting, checkpoints); a :class:`Task` supplies only what differs between
the two-tower retriever and the cross-encoder ranker. A task is pickled into
``train_loop_config``, so it must hold plain config only; per-run state is set on the worker
in :meth:`Task.start`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import nn

from training.config import StageConfig

#: one training example (a row of ``train_examples``)
Row = Mapping[str, Any]
#: a collated batch, moved to the worker's device by Ray's data loader
Batch = dict[str, torch.Tensor]
ModelT = TypeVar("ModelT", bound=nn.Module)
EvalT = TypeVar("EvalT")


class Task(ABC, Generic[ModelT, EvalT]):
    """What one stage trains: model, batches, loss, evaluation and saved format."""

    #: the stage name: config section, log prefix and Ray run-directory suffix
    name: ClassVar[str]
    cfg: StageConfig

    @abstractmethod
    def build_model(self, pretrained: str) -> ModelT:
        """A fresh model initialised from the pretrained BERT directory."""

    @abstractmethod
    def load_model(self, checkpoint: Path) -> ModelT:
        """The model :meth:`save_model` wrote into a checkpoint directory (to resume)."""

    @abstractmethod
    def save_model(self, model: ModelT, tokenizer: Any, checkpoint: Path) -> None:
        """Write the model in its exported format into a checkpoint directory."""

    @abstractmethod
    def collator(self, tokenizer: Any) -> Callable[[Sequence[Row]], Batch]:
        """Turns a list of rows into tensors (runs in the data loader)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The training loss of a batch; ``model`` is the DDP-wrapped one, so the forward
        pass must go through it for gradients to be synchronised."""

    @abstractmethod
    def evaluate(
        self, model: ModelT, tokenizer: Any, data: EvalT, device: torch.device
    ) -> dict[str, float]:
        """Validation metrics (rank 0 only, after every epoch)."""

    def start(self, rows: Sequence[Row], device: torch.device) -> str:
        """Set per-run state from the training rows (every worker, before the first epoch);
        returns how the log describes them."""
        return f"{len(rows)} examples"

    def progress(self, model: ModelT) -> dict[str, float]:
        """Model values logged with every step and added to the epoch metrics."""
        return {}
