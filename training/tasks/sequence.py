"""The SASRec-style sequence model as a :class:`~training.tasks.base.Task`: cross-entropy over
the catalogue (or a logQ-corrected sampled softmax) at every position of the training
sequences, NDCG@10/Recall@10 of the validation users' next positives.

The catalogue (:class:`~training.models.sequence_data.ItemSpace`: item ids, frozen content
vectors, request-time snapshots) is too big for plain config, so the driver puts it into
Ray's object store once and the task carries the reference; :meth:`SequenceTask.item_space`
fetches it on the worker.

Checkpoint format: ``sequence/`` (see :func:`training.models.sequence.save_sequence_model`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from training.config import SequenceConfig
from training.models.sequence import (
    TERM_SCALE,
    SASRec,
    SequenceEval,
    evaluate_sequence,
    load_sequence_model,
    save_sequence_model,
)
from training.models.sequence_data import ItemSpace, SequenceCollator
from training.tasks.base import Batch, Row, Task

SUBDIR = "sequence"


@dataclass
class SequenceTask(Task[SASRec, SequenceEval]):
    """Next-interaction prediction over users' event sequences (see the module docstring)."""

    cfg: SequenceConfig
    #: the :class:`ItemSpace`, or a Ray ``ObjectRef`` of it (the driver puts it once)
    space: Any
    name: ClassVar[str] = "sequence"

    def item_space(self) -> ItemSpace:
        if isinstance(self.space, ItemSpace):
            return self.space
        import ray

        space = ray.get(self.space)
        if not isinstance(space, ItemSpace):
            raise TypeError(f"expected an ItemSpace, got {type(space).__name__}")
        return space

    def build_model(self, pretrained: str) -> SASRec:
        # ``pretrained`` is not fine-tuned here: its item vectors are already in the space
        return SASRec(self.cfg, self.item_space())

    def load_model(self, checkpoint: Path) -> SASRec:
        return load_sequence_model(checkpoint / SUBDIR)

    def save_model(self, model: SASRec, tokenizer: Any, checkpoint: Path) -> None:
        save_sequence_model(model, checkpoint / SUBDIR)

    def collator(self, tokenizer: Any) -> SequenceCollator:
        # seeded from NumPy's global state, which the loop seeds per rank
        return SequenceCollator(self.cfg.max_seq_len, seed=int(np.random.randint(2**31)))

    def start(self, rows: Sequence[Row], device: torch.device) -> str:
        events = sum(len(r["items"]) for r in rows)
        return f"{len(rows)} sequences ({events} events)"

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        loss: torch.Tensor = model(batch)
        return loss

    def evaluate(
        self, model: SASRec, tokenizer: Any, data: SequenceEval, device: torch.device
    ) -> dict[str, float]:
        return evaluate_sequence(model, data, batch_size=self.cfg.eval_batch_size, device=device)

    def progress(self, model: SASRec) -> dict[str, float]:
        # the learned weight of all-time popularity in the request-time term
        return {"w_pop_all_time": float(model.pop_weight[-1].item()) * TERM_SCALE}
