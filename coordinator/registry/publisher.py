"""Publish one endpoint under a key the way go-zero's core/discov/publisher.go does.

go-zero's layout: grant a lease of 10 s, put ``<key>/<lease id in decimal>`` = the
endpoint with that lease, keep the lease alive. When the lease is lost (etcd restarted
without its data, or we could not reach it for longer than the TTL) the publisher
registers again under a new lease. Stopping revokes the lease, so the key disappears at
once instead of after the TTL and clients stop picking this endpoint.

etcd being down never stops the caller: the publisher keeps trying in the background
and logs at most once per `log_interval` while it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from coordinator.registry.etcd import ETCD_ERRORS, EtcdClient, EtcdTls, describe_error
from coordinator.registry.target import EtcdTarget, parse_etcd_target

log = logging.getLogger("coordinator.registry")

LEASE_TTL = 10  # seconds, go-zero's discov.TimeToLive


class Publisher:
    def __init__(
        self,
        target: EtcdTarget | str,
        endpoint: str,
        tls: EtcdTls | None = None,
        ttl: int = LEASE_TTL,
        retry_interval: float = 1.0,
        log_interval: float = 10.0,
    ) -> None:
        self.target = parse_etcd_target(target) if isinstance(target, str) else target
        self.endpoint = endpoint
        self.ttl = ttl
        self.retry_interval = retry_interval
        self.log_interval = log_interval
        self.client = EtcdClient(self.target, tls)
        self.lease_id: int | None = None
        # Set while a key is in etcd under a live lease (tests and callers may wait on it).
        self.registered = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_warning = -float("inf")

    @property
    def key(self) -> str | None:
        """The key currently published, ``<key>/<lease id>``."""
        return None if self.lease_id is None else f"{self.target.key}/{self.lease_id}"

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="etcd-publisher")

    async def wait_registered(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.registered.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self, timeout: float = 3.0) -> None:
        """Stop keeping the lease alive and revoke it, so the key disappears now."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        lease_id, self.lease_id = self.lease_id, None
        self.registered.clear()
        if lease_id is not None:
            try:
                await asyncio.wait_for(self.client.revoke_lease(lease_id), timeout)
                log.info("unregistered %s from %s", self.endpoint, self.target.describe())
            except ETCD_ERRORS as exc:
                # The lease runs out by itself within the TTL.
                log.warning("could not revoke etcd lease %d (%s); its key expires within "
                            "%d s", lease_id, describe_error(exc), self.ttl)
        await self.client.close_quietly()

    async def _run(self) -> None:
        while True:
            try:
                await self._register()
                await self._keep_alive()
            except ETCD_ERRORS as exc:
                self._warn(exc)
                self.registered.clear()
                await self.client.rotate()
            except Exception:  # a bug must not end the registration for good
                log.exception("etcd publisher of %s failed; trying again", self.endpoint)
                self.registered.clear()
                await self.client.rotate()
            await asyncio.sleep(self.retry_interval)

    async def _register(self) -> None:
        if self.lease_id is not None:
            # Still alive (etcd came back in time, or another member has it): keep it.
            reply = await self.client.refresh_lease(self.lease_id)
            if reply is not None and reply.TTL > 0:
                self.registered.set()
                return
        lease = await self.client.lease(self.ttl)
        key = f"{self.target.key}/{lease.id}"
        await self.client.put(key.encode(), self.endpoint.encode(), lease=lease.id)
        self.lease_id = lease.id
        self.registered.set()
        self._last_warning = -float("inf")
        log.info("registered %s in %s: key %r, lease %d (ttl %d s)", self.endpoint,
                 self.target.describe(), key, lease.id, lease.ttl)

    async def _keep_alive(self) -> None:
        """Refresh the lease a few times per TTL; return when it is gone."""
        assert self.lease_id is not None
        while True:
            await asyncio.sleep(self.ttl / 3)
            reply = await self.client.refresh_lease(self.lease_id)
            if reply is None or reply.TTL <= 0:
                log.warning("etcd lease %d of %s is gone; registering again",
                            self.lease_id, self.key)
                self.lease_id = None
                self.registered.clear()
                return

    def _warn(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_warning < self.log_interval:
            return
        self._last_warning = now
        log.warning("cannot register %s in %s (at %s): %s; still serving, retrying every "
                    "%.0f s", self.endpoint, self.target.describe(), self.client.member,
                    describe_error(exc), self.retry_interval)
