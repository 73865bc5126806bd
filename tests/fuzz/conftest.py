"""The fuzz tests reuse the integration fixtures: a real tritonserver, Milvus Lite and gateway.

Re-exported here, the session ``stack`` is a second, independent one (pytest keys fixtures
by the directory of their conftest), so whatever the fuzzer writes never reaches the
catalogue the integration tests assert on.
"""

from tests.integration.conftest import *  # noqa: F403
