"""The bottom layer: what serving and training must agree on, and nothing else.

Event types and the implicit-feedback rule (:mod:`core.events`), the text a BERT tower reads
(:mod:`core.text`), behaviour aggregates (:mod:`core.behaviour`), the one typed settings
object (:mod:`core.config`), the Milvus schema and its typed rows (:mod:`core.milvus_schema`,
:mod:`core.rows`) and the fusion kernels (:mod:`core.fusion`). It imports nothing of the
platform's own and no torch, Ray or transformers: the gateway image installs it as is.
"""
