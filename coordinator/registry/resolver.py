"""Keep the endpoints published under a go-zero key current, as go-zero's subscriber does.

A resolver reads the prefix ``<key>/`` once, then watches it from the next revision:
a put adds an endpoint, a delete (revoke, lease expiry) drops it. Callers pick an
endpoint from memory (round-robin), so a branch call costs no etcd round trip. When
etcd goes away the last known list is kept and the resolver reconnects, reading the
prefix afresh so nothing that changed meanwhile is missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable

from coordinator.registry.etcd import ETCD_ERRORS, EtcdClient, EtcdTls, describe_error
from coordinator.registry.target import EtcdTarget, parse_etcd_target

log = logging.getLogger("coordinator.registry")


class Resolver:
    def __init__(self, target: EtcdTarget | str, tls: EtcdTls | None = None,
                 retry_interval: float = 1.0) -> None:
        self.target = parse_etcd_target(target) if isinstance(target, str) else target
        self.client = EtcdClient(self.target, tls)
        self.retry_interval = retry_interval
        self._by_key: dict[bytes, str] = {}
        self._endpoints: tuple[str, ...] = ()
        self._counter = itertools.count()
        # Set once the prefix has been read (the list may still be empty).
        self.ready = asyncio.Event()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._warned = False

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self._endpoints

    def pick(self) -> str | None:
        """The next endpoint, round-robin; None when nothing is registered."""
        endpoints = self._endpoints
        if not endpoints:
            return None
        return endpoints[next(self._counter) % len(endpoints)]

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"etcd-resolver-{self.target.key}")

    async def wait_ready(self, timeout: float) -> bool:
        self.start()
        try:
            await asyncio.wait_for(self.ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def wait_for(self, predicate: Callable[[tuple[str, ...]], bool],
                       timeout: float) -> bool:
        """Wait until `predicate(endpoints)` holds (for tests and start-up checks)."""
        deadline = asyncio.get_running_loop().time() + timeout
        self.start()
        while not predicate(self._endpoints):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.client.close_quietly()

    async def _run(self) -> None:
        while True:
            try:
                await self._sync_and_watch()
            except ETCD_ERRORS as exc:
                if not self._warned:
                    log.warning("cannot read %s (at %s): %s; keeping %d known endpoint(s), "
                                "retrying", self.target.describe(), self.client.member,
                                describe_error(exc), len(self._endpoints))
                    self._warned = True
                await self.client.rotate()
            except Exception:  # a bug must not freeze the endpoint list for good
                log.exception("resolver of %s failed; reading again", self.target.describe())
                await self.client.rotate()
            await asyncio.sleep(self.retry_interval)

    async def _sync_and_watch(self) -> None:
        prefix = self.target.prefix.encode()
        result = await self.client.get_prefix(prefix)
        self._by_key = {kv.key: kv.value.decode() for kv in result}
        self._publish()
        self.ready.set()
        if self._warned:
            log.info("reading %s again: %d endpoint(s)", self.target.describe(),
                     len(self._endpoints))
            self._warned = False
        watch = await self.client.watch_prefix(prefix, start_revision=result.header.revision + 1)
        try:
            async for event in watch:
                if event.kind == "PUT":  # a str, though typed as EventKind
                    self._by_key[event.kv.key] = event.kv.value.decode()
                else:
                    self._by_key.pop(event.kv.key, None)
                self._publish()
        finally:
            with contextlib.suppress(*ETCD_ERRORS):
                await watch.cancel()

    def _publish(self) -> None:
        # Several keys may carry one endpoint (a process with several workers): dedupe.
        self._endpoints = tuple(sorted(set(self._by_key.values())))
        self._changed.set()


class Resolvers:
    """One resolver per registry target, started on first use and shared by callers."""

    def __init__(self, tls: EtcdTls | None = None) -> None:
        self.tls = tls
        self._resolvers: dict[str, Resolver] = {}

    def get(self, target: str) -> Resolver:
        resolver = self._resolvers.get(target)
        if resolver is None:
            resolver = Resolver(target, self.tls)
            self._resolvers[target] = resolver
            resolver.start()
        return resolver

    async def close(self) -> None:
        resolvers, self._resolvers = list(self._resolvers.values()), {}
        for resolver in resolvers:
            await resolver.close()
