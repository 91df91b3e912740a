"""The test cluster (bench/redis_cluster.py starts it) and a marker for core cases."""

from __future__ import annotations

import pytest

from bench.redis_cluster import RedisClusterProcess, free_cluster_ports, have_cluster_tools

__all__ = ["CLUSTER_TOO", "RedisClusterProcess", "free_cluster_ports", "have_cluster_tools"]

# Runs a test on one Redis and on the test cluster (the `backend_url` fixture of
# conftest.py); kept to core cases, so that CI time stays small.
CLUSTER_TOO = pytest.mark.parametrize("backend_url", ["redis", "cluster"], indirect=True)
