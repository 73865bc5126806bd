"""What the stages train, each as a :class:`Task` run by the one loop in
:mod:`training.loop`: :class:`RetrievalTask` (two-tower, in-batch softmax),
:class:`RankerTask` (cross-encoder, BCE) and :class:`SequenceTask` (SASRec, softmax over the
catalogue)."""

from training.tasks.base import Task
from training.tasks.ranker import RankerTask
from training.tasks.retrieval import RetrievalTask
from training.tasks.sequence import SequenceTask

__all__ = ["RankerTask", "RetrievalTask", "SequenceTask", "Task"]
