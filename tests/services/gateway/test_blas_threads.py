"""The gateway process runs numpy with one BLAS thread unless its environment says otherwise
(OpenBLAS's pool made each 100x384 product ~25x slower on two shared cores)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from core.paths import REPO_ROOT

# not imported from services.gateway.__main__: importing it sets them in this process
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

# what numpy runs with once the gateway's entry point is imported (not run), numpy after it
# as the server's modules (or a spawned gateway process, which inherits the environment)
# import it
PROBE = (
    "import services.gateway.__main__, numpy, threadpoolctl; "
    "print([p['num_threads'] for p in threadpoolctl.threadpool_info() "
    "if p['internal_api'] == 'openblas'])"
)


def _blas_threads(**env: str) -> str:
    pytest.importorskip("threadpoolctl")  # a dependency of training's scikit-learn
    clean = {k: v for k, v in os.environ.items() if k not in BLAS_THREAD_VARIABLES}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, **env},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_gateway_runs_one_blas_thread() -> None:
    assert _blas_threads() == "[1]"


def test_an_explicit_setting_wins() -> None:
    assert _blas_threads(OPENBLAS_NUM_THREADS="2") == "[2]"
