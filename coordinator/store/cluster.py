"""Redis Cluster: finding it, connecting to it, and describing it to an operator.

A cluster is detected at start-up from ``INFO cluster`` (``cluster_enabled:1``) on the
first seed that answers, unless ``redis.cluster`` forces the mode. One seed is enough:
redis-py's asyncio ``RedisCluster`` reads the slot map from it and finds every other
node; more seeds (comma-separated hosts in ``redis.url``, or ``redis.cluster_nodes``)
only matter when the first one may be down at start-up.

Every key of one transaction carries its partition's hash tag ``{pN}``, so each script
runs on the one primary that owns the partition's slot; see keys.py and the README.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisError

from coordinator.keys import KeySpace, tag

log = logging.getLogger("coordinator.cluster")

Seed = tuple[str, int]


def parse_seeds(url: str, cluster_nodes: str = "") -> list[Seed]:
    """Seeds from ``redis://h1:p1,h2:p2/0`` and/or ``cluster_nodes = "h3:p3,h4:p4"``."""
    hosts: list[str] = []
    if url:
        netloc = url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
        hosts += [h for h in netloc.split(",") if h]
    hosts += [h.strip() for h in cluster_nodes.split(",") if h.strip()]
    seeds: list[Seed] = []
    for h in hosts:
        host, _, port = h.rpartition(":")
        if not host:
            host, port = port, "6379"
        seeds.append((host.strip("[]"), int(port)))
    return seeds


def first_url(url: str) -> str:
    """A single-node URL from a possibly comma-separated one (the first host)."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    auth, at, hosts = netloc.rpartition("@")
    return f"{scheme}{sep}{auth}{at}{hosts.split(',')[0]}{slash}{path}"


def _credentials(url: str) -> dict[str, Any]:
    parts = urlsplit(first_url(url))
    out: dict[str, Any] = {}
    if parts.password:
        out["password"] = parts.password
    if parts.username:
        out["username"] = parts.username
    return out


async def is_cluster(url: str, cluster_nodes: str = "") -> bool:
    """Whether the first seed that answers runs with ``cluster-enabled yes``."""
    last: Exception | None = None
    for host, port in parse_seeds(url, cluster_nodes):
        client = aioredis.Redis(
            host=host, port=port, socket_connect_timeout=3, socket_timeout=5,
            **_credentials(url),
        )
        try:
            info = await client.info("cluster")
            return bool(int(info.get("cluster_enabled", 0)))
        except (RedisError, OSError) as exc:
            last = exc
        finally:
            await client.aclose()
    raise ConnectionError(f"no Redis seed answers ({url or cluster_nodes}): {last}")


def cluster_client(seeds: Sequence[Seed], url: str = "") -> RedisCluster:
    """An asyncio RedisCluster on the given seeds; it discovers the rest of the nodes."""
    return RedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in seeds],
        decode_responses=True,
        # Per node; one coordinator drives up to engine.concurrency transactions.
        max_connections=512,
        socket_connect_timeout=2,
        socket_timeout=5,
        # On MOVED, patch the slot map from the reply; never reload it wholesale: redis-py
        # reloads by closing every connection, which breaks the commands other tasks
        # have in flight on them (seen during resharding under load).
        reinitialize_steps=0,
        **_credentials(url),
    )


def partition_spread(keys: KeySpace, primaries: dict[str, list[tuple[int, int]]]) -> Counter[str]:
    """How many partitions each primary owns, from its slot ranges."""
    spread: Counter[str] = Counter({name: 0 for name in primaries})
    for p in range(keys.partitions):
        slot = key_slot(tag(p).encode())
        for name, ranges in primaries.items():
            if any(lo <= slot <= hi for lo, hi in ranges):
                spread[name] += 1
    return spread


async def describe(client: RedisCluster, keys: KeySpace) -> str:
    """One log line: primaries with their replicas, slots and partitions."""
    # redis-py parses CLUSTER SLOTS into {(first, last): {"primary": (host, port, id),
    # "replicas": [(host, port, id), ...]}}.
    slots: Any = await client.execute_command("CLUSTER SLOTS", target_nodes=RedisCluster.RANDOM)
    primaries: dict[str, list[tuple[int, int]]] = {}
    replicas: dict[str, set[str]] = {}
    for (lo, hi), info in slots.items():
        name = f"{info['primary'][0]}:{info['primary'][1]}"
        primaries.setdefault(name, []).append((int(lo), int(hi)))
        replicas.setdefault(name, set()).update(f"{r[0]}:{r[1]}" for r in info["replicas"])
    spread = partition_spread(keys, primaries)
    parts = []
    for name in sorted(primaries):
        count = sum(hi - lo + 1 for lo, hi in primaries[name])
        reps = ",".join(sorted(replicas[name])) or "none"
        parts.append(f"{name} ({count} slots, {spread[name]} partitions, replicas {reps})")
    return f"Redis Cluster, {len(primaries)} primaries: " + "; ".join(parts)


async def node_health(client: aioredis.Redis | RedisCluster) -> dict[str, Any]:
    """Per node: its role and whether it answers PING now."""
    if not isinstance(client, RedisCluster):
        try:
            ok = bool(await client.ping())
        except (RedisError, OSError):
            ok = False
        where = client.connection_pool.connection_kwargs
        node = where.get("path") or f"{where.get('host', '')}:{where.get('port', '')}"
        return {"mode": "single", "ok": ok,
                "nodes": [{"node": str(node), "role": "primary", "ok": ok}]}
    nodes = []
    for node in client.get_nodes():
        try:
            ok = bool(await client.ping(target_nodes=node))
        except (RedisError, OSError):
            ok = False
        nodes.append({"node": node.name, "role": node.server_type or "", "ok": ok})
    primaries_ok = all(n["ok"] for n in nodes if n["role"] == "primary")
    return {"mode": "cluster", "ok": primaries_ok, "nodes": nodes}
