"""What the stages train, each as a :class:`Task` run by the one loop in
:mod:`training.loop`: :class:`RetrievalTask` (two-tower, in-batch softmax),
:class:`RankerTask` (cross-encoder, BCE), :class:`FeatureRankerTask` (DCN-v2 on the
gateway's candidate features, BCE) and :class:`SequenceTask` (SASRec, softmax over the
catalogue).

Each task's module is imported when the task is first asked for (PEP 562): the sequence
model trains on a lent GPU machine (``python -m bench.gpu_train``) that has PyTorch but not
the serving stack the feature ranker's candidates import (pymilvus)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from training.tasks.base import Task

if TYPE_CHECKING:
    from training.tasks.feature_ranker import FeatureRankerTask
    from training.tasks.ranker import RankerTask
    from training.tasks.retrieval import RetrievalTask
    from training.tasks.sequence import SequenceTask

_MODULES = {
    "FeatureRankerTask": "feature_ranker",
    "RankerTask": "ranker",
    "RetrievalTask": "retrieval",
    "SequenceTask": "sequence",
}

__all__ = ["FeatureRankerTask", "RankerTask", "RetrievalTask", "SequenceTask", "Task"]


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return getattr(importlib.import_module(f"training.tasks.{_MODULES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
