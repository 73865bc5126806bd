"""The offline reference system's name, in one place: the evaluation's fused pipeline
(:class:`~training.evaluation.pipeline.HybridPipeline`) registers under it, and the report
judges a served system against the system of that name without importing the pipeline."""

OFFLINE_REFERENCE = "pipeline"
