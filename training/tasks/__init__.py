"""What the stages train, each as a :class:`Task` run by the one loop in
:mod:`training.loop`: :class:`RetrievalTask` (two-tower, in-batch softmax),
:class:`RankerTask` (cross-encoder, BCE), :class:`FeatureRankerTask` (DCN-v2 on the
gateway's candidate features, BCE) and :class:`SequenceTask` (SASRec, softmax over the
catalogue)."""

from training.tasks.base import Task
from training.tasks.feature_ranker import FeatureRankerTask
from training.tasks.ranker import RankerTask
from training.tasks.retrieval import RetrievalTask
from training.tasks.sequence import SequenceTask

__all__ = ["FeatureRankerTask", "RankerTask", "RetrievalTask", "SequenceTask", "Task"]
