"""go-zero's registry from the SDK: publish a gRPC service, find one.

`register_service` publishes exactly as go-zero's publisher (and the coordinator's
``--register``) does: ``<key>/<lease id>`` = endpoint under a 10 s lease kept alive,
registered again when the lease is lost, revoked by ``await publisher.stop()``.
`resolve_target` turns a target into the endpoints to dial, for clients that pick one
themselves; a long-lived client keeps a `Resolver`, which watches the key.
"""

from __future__ import annotations

from coordinator.registry.etcd import EtcdTls
from coordinator.registry.publisher import Publisher
from coordinator.registry.resolver import Resolver
from coordinator.registry.target import is_registry_url

__all__ = ["EtcdTls", "Publisher", "Resolver", "register_service", "resolve_target"]


async def register_service(
    target: str, endpoint: str, tls: EtcdTls | None = None, wait: float = 5.0
) -> Publisher:
    """Publish `endpoint` under `target` (``etcd://h:2379/trans.rpc``); keep it alive.

    Waits up to `wait` seconds for the first registration; if etcd is not reachable by
    then the publisher keeps trying in the background (check ``publisher.registered``).
    """
    publisher = Publisher(target, endpoint, tls)
    publisher.start()
    await publisher.wait_registered(wait)
    return publisher


async def resolve_target(target: str, tls: EtcdTls | None = None,
                         timeout: float = 5.0) -> list[str]:
    """The endpoints registered under `target` now; ``host:port`` resolves to itself."""
    if not is_registry_url(target):
        return [target]
    resolver = Resolver(target, tls)
    try:
        if not await resolver.wait_ready(timeout):
            raise TimeoutError(f"could not read {resolver.target.describe()} in {timeout} s")
        return list(resolver.endpoints)
    finally:
        await resolver.close()
