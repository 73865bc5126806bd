"""Fixtures every test directory may use.

The layout of ``tests/`` mirrors the source tree; what a test needs is a marker, not a folder:
``integration`` (starts real tritonserver, Milvus, the gateway or Ray) and ``fuzz``
(generated inputs; ``make fuzz`` raises their count).
"""

from tests.stack_fixtures import *  # noqa: F403
