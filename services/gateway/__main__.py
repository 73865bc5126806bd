"""``python -m services.gateway``: run the gateway with settings from the environment.

The gateway's numpy products are small (100 candidates x 384 dims) and run on many request
threads at once: OpenBLAS's own thread pool per product only adds hand-offs and spinning
threads that take the cores from Milvus and Triton (one product pair took ~10 ms with the
default pool against 0.4 ms with one thread, on 2 busy cores; Recommend p50 at concurrency 1
fell from 55 to 27-31 ms). So the gateway runs one BLAS thread, wherever it is started
(local stack, container, pod), unless the environment names another number; it is set here,
before anything imports numpy.
"""

from __future__ import annotations

import os

BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
for _variable in BLAS_THREAD_VARIABLES:
    os.environ.setdefault(_variable, "1")

import logging  # noqa: E402

from core.config import get_settings  # noqa: E402


def main() -> None:
    """One gateway process, or ``gateway_processes`` of them under a supervisor."""
    settings = get_settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.gateway_processes > 1:
        from services.gateway.processes import supervise

        raise SystemExit(supervise(settings))
    from services.gateway.server import serve

    serve(settings)


if __name__ == "__main__":
    main()
