"""``Recommend`` as named stages over one request context.

* :mod:`.context` - :class:`~.context.Context` (the request, its deadline, what each stage
  produced), the :class:`~.context.Stage` base that times a stage, the answer type;
* :mod:`.profile` - the user's Milvus row and recent history;
* :mod:`.retrieve` - ANN, co-occurrence, segment and global popularity, fused by RRF; the
  cached popularity and the answer when Milvus is down;
* :mod:`.rank` - the CTR ranker on Triton as one more vote in the fusion;
* :mod:`.diversify` - the final ``k`` by MMR;
* :mod:`.explain` - one human-readable reason per item;
* :mod:`.pipeline` - :class:`~.pipeline.Pipeline`, the stages in order.
"""
