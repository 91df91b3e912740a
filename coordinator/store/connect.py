"""Open the Redis store the settings ask for: one Redis, or a Redis Cluster."""

from __future__ import annotations

import logging
from typing import Any

from coordinator.keys import KeySpace
from coordinator.settings import RedisSettings
from coordinator.store.cluster import first_url, is_cluster, parse_seeds
from coordinator.store.redis_store import RedisStore

log = logging.getLogger("coordinator")


async def use_cluster(url: str, redis: RedisSettings) -> bool:
    """`redis.cluster`: "true"/"false" force the mode, "auto" asks the first seed."""
    if redis.cluster in ("true", "false"):
        return redis.cluster == "true"
    if url.startswith("unix://") or (not url and not redis.cluster_nodes):
        return False
    try:
        return await is_cluster(url, redis.cluster_nodes)
    except ConnectionError as exc:
        # The single-node client has its own reconnect handling; let it report.
        log.warning("cannot tell whether Redis is a cluster (%s); assuming one node", exc)
        return False


async def open_store(url: str, redis: RedisSettings, keys: KeySpace, **kwargs: Any) -> RedisStore:
    kwargs.update(wait_replicas=redis.wait_replicas,
                  wait_timeout_ms=int(redis.wait_timeout * 1000))
    if await use_cluster(url, redis):
        return RedisStore.from_cluster(
            parse_seeds(url, redis.cluster_nodes), keys, url=url, **kwargs
        )
    return RedisStore.from_url(first_url(url) if "," in url else url, keys, **kwargs)


async def log_topology(store: RedisStore) -> None:
    """Say at start-up what the coordinator runs on: one Redis, or which cluster nodes."""
    from redis.asyncio.cluster import RedisCluster

    from coordinator.store.cluster import describe

    if isinstance(store.client, RedisCluster):
        log.info("%s", await describe(store.client, store.keys))
    else:
        log.info("Redis: one node (not a cluster), %d partitions", store.partitions)
