"""Generated gRPC stubs for ``recsys.v1`` (built by ``make proto`` from ``proto/``; never edited),
and :mod:`services.api.validation`, the rules every request and stored event is checked by.

The generated modules import each other as ``recsys.v1...``, so this package puts its own
directory on ``sys.path`` and re-exports them.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

try:
    from recsys.v1 import recommender_pb2 as pb
    from recsys.v1 import recommender_pb2_grpc as pb_grpc
except ImportError as exc:  # pragma: no cover - only before the first build
    raise ImportError(
        "gRPC stubs are missing: run `make proto` (generated from proto/recsys/v1)"
    ) from exc

__all__ = ["pb", "pb_grpc"]
