"""Bit-reproducible training in this process.

With more than one intra-op thread, some of PyTorch's CPU kernels accumulate in whatever order
the threads finish, so the same seed gave a different replay twin on every ``make train``.
That moved the release choice's figures between runs of the same data (0.0690 and 0.0699 for
the shop's ranker with the sequence model), enough to flip a choice that sat near the
one-standard-error line (training/evaluation/FINDINGS.md). PyTorch's deterministic kernels
fix the order; on the sequence model they were also faster here. Kernels without a
deterministic version warn instead of failing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def deterministic() -> Iterator[None]:
    """PyTorch's deterministic algorithms inside, the caller's setting restored after; also a
    decorator (``@deterministic()``)."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
