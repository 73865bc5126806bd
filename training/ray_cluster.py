"""Connecting to Ray: the cluster in ``RAY_ADDRESS`` (``ray job submit`` sets it), else a
local one, retried because Ray gives a local raylet a fixed 30 s to register and a loaded
2-core machine can miss that once, because a local dashboard can die as it starts (a
fresh-clone CI run, 2026-12-04: return code -6 before it wrote a log, right after another
local Ray in the same process had shut down; Ray then raises a bare Exception), and because
the GCS server can miss its 30 s to write its port file (another fresh-clone CI run the
same day, 30 s after another local Ray of the same process had shut down: a RuntimeError
"Timed out waiting for file .../gcs_server_port_...", the session's log folder empty)."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

log = logging.getLogger(__name__)
# What Ray's errors from a failed local start say, for the starts worth another try.
RETRIED_STARTS = ("timed out during startup", "dashboard", "Timed out waiting for file")


def connect(num_cpus: int | None = None, attempts: int = 3, **kwargs: Any) -> None:
    """``ray.init`` for a cluster or a local node (dashboard on loopback only)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
        return
    kwargs.setdefault("include_dashboard", True)  # Ray Train's cleaner uses the state API
    kwargs.setdefault("dashboard_host", "127.0.0.1")
    for attempt in range(1, attempts + 1):
        try:
            ray.init(num_cpus=num_cpus or os.cpu_count() or 2, **kwargs)
            return
        except Exception as exc:  # Ray raises bare Exceptions and RuntimeErrors
            if not any(s in str(exc) for s in RETRIED_STARTS) or attempt == attempts:
                raise
            log.warning("local Ray did not start (attempt %d: %s); retrying", attempt, exc)
            ray.shutdown()
            time.sleep(2 * attempt)
