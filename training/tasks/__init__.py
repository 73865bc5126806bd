"""What the two stages train, each as a :class:`Task` run by the one loop in
:mod:`training.loop`: :class:`RetrievalTask` (two-tower, in-batch softmax) and
:class:`RankerTask` (cross-encoder, BCE)."""

from training.tasks.base import Task
from training.tasks.ranker import RankerTask
from training.tasks.retrieval import RetrievalTask

__all__ = ["RankerTask", "RetrievalTask", "Task"]
