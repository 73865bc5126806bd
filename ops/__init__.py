"""The top layer: jobs that compose serving (``services``) and training (``training``).

The local stack (tritonserver, Milvus, the gateway), ``make demo``/``make serve``, the
served evaluation, catalogue/user indexing and segment jobs, and the A/B replay. Nothing
below imports from here.
"""
