"""The Redis backend: every transition is one Lua script, called by EVALSHA."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from coordinator.errors import AlreadyExists, NotFound, raise_for_reply
from coordinator.keys import KeySpace
from coordinator.model import Branch, Status, Trans
from coordinator.store.base import (
    Claimed,
    ListFilter,
    Page,
    Store,
    Topic,
    Transition,
    TransitionResult,
)
from coordinator.store.batch import ScriptBatcher
from coordinator.store.codec import (
    CorruptRecord,
    branches_json,
    pairs_to_dict,
    trans_fields,
    trans_from_hash,
)
from coordinator.store.scripts import SCRIPT_NAMES, script_text

log = logging.getLogger("coordinator.store")


class RedisStore(Store):
    """Transactions as Redis hashes, with a partitioned due-index (see keys.py)."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: KeySpace,
        *,
        lease_ms: int = 30_000,
        finished_ttl_s: int = 86_400,
        batch: bool = True,
    ) -> None:
        self.client = client
        self.keys = keys
        self.partitions = keys.partitions
        self.lease_ms = lease_ms
        self.finished_ttl_s = finished_ttl_s
        # register_script only computes the SHA; start() loads them so that the first
        # call of each is already an EVALSHA hit. AsyncScript reloads on NOSCRIPT.
        self.scripts: dict[str, AsyncScript] = {
            name: client.register_script(script_text(name)) for name in SCRIPT_NAMES
        }
        # Creates and transitions of concurrent transactions share round trips.
        self._batch = ScriptBatcher(client, max_batch=256 if batch else 1)

    @classmethod
    def from_url(cls, url: str, keys: KeySpace, **kwargs: Any) -> RedisStore:
        client = aioredis.Redis.from_url(url, decode_responses=True, max_connections=512)
        return cls(client, keys, **kwargs)

    async def start(self) -> None:
        for script in self.scripts.values():
            await self.client.script_load(script.script)

    async def close(self) -> None:
        await self.client.aclose()

    async def ping(self) -> bool:
        return bool(await self.client.ping())

    def create_call(
        self, trans: Trans, *, due_in_ms: int, owner: str = "", lease_ms: int = 0
    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of lua/create.lua for this transaction."""
        keys = self.keys.for_gid(trans.gid)
        return keys.as_list()[:4], [
            trans.gid,
            trans.status.value,
            orjson.dumps(trans_fields(trans)).decode(),
            branches_json(trans.branches),
            max(0, due_in_ms),
            owner,
            lease_ms or self.lease_ms,
        ]

    async def create(
        self, trans: Trans, *, due_in_ms: int, owner: str = "", lease_ms: int = 0
    ) -> int:
        keys, args = self.create_call(trans, due_in_ms=due_in_ms, owner=owner, lease_ms=lease_ms)
        reply = await self._batch.call(self.scripts["create"], keys, args)
        raise_for_reply(reply[0], trans.gid, reply[1], "create")
        return int(reply[1])

    def transition_call(self, gid: str, change: Transition) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of lua/transition.lua for this change."""
        return self.keys.for_gid(gid).as_list(), [
            gid,
            ",".join(s.value for s in change.expected),
            change.owner,
            change.new_status.value if change.new_status else "",
            orjson.dumps(dict(change.fields)).decode(),
            orjson.dumps({k: v.value for k, v in change.branch_updates.items()}).decode(),
            "" if change.next_due_ms is None else max(0, change.next_due_ms),
            change.lease,
            change.lease_ms or self.lease_ms,
            self.finished_ttl_s,
        ]

    async def transition(self, gid: str, change: Transition) -> TransitionResult:
        keys, args = self.transition_call(gid, change)
        reply = await self._batch.call(self.scripts["transition"], keys, args)
        wanted = f"move to '{change.new_status.value}'" if change.new_status else "update"
        raise_for_reply(reply[0], gid, reply[1] if len(reply) > 1 else "", wanted)
        return TransitionResult(Status(reply[1]), int(reply[2]), reply[3] == "1")

    async def load(self, gid: str) -> Trans | None:
        keys = self.keys.for_gid(gid)
        fields, branches = await self.scripts["load"](keys=[keys.trans, keys.branches])
        if not fields:
            return None
        return trans_from_hash(pairs_to_dict(fields), pairs_to_dict(branches))

    async def claim(self, partition: int, limit: int, token_prefix: str) -> list[Claimed]:
        reply = await self.scripts["claim"](
            keys=[self.keys.due(partition)],
            args=[
                self.keys.trans_prefix(partition),
                self.keys.branches_prefix(partition),
                limit,
                token_prefix,
                self.lease_ms,
            ],
        )
        now = int(reply[0])
        claimed = []
        for _gid, token, f, b in reply[1:]:
            try:
                trans = trans_from_hash(pairs_to_dict(f), pairs_to_dict(b))
            except CorruptRecord as exc:
                # Left to its lease (and reported each time it comes round): one damaged
                # record must not fail the claim of every transaction in its batch.
                log.warning("%s; not driving it", exc)
                continue
            claimed.append(Claimed(trans, token, now))
        return claimed

    async def sweep(self, partition: int) -> int:
        keys = self.keys.partition_keys(partition)
        return int(
            await self.scripts["sweep"](keys=keys, args=[self.keys.trans_prefix(partition), 500])
        )

    async def list(self, position: str, limit: int, where: ListFilter) -> Page:
        """Merge the partitions' listing indexes, newest first.

        Members are "<13-digit create ms>:<gid>", unique per transaction, so the last
        member returned is an exact cursor: no page repeats or skips a transaction that
        existed for the whole walk.
        """
        upper = "+"
        if where.create_to_ms:
            upper = f"({where.create_to_ms:013d}"
        if position and (upper == "+" or position < upper[1:]):
            upper = "(" + position
        lower = f"[{where.create_from_ms:013d}" if where.create_from_ms else "-"
        found: list[Trans] = []
        cursor = ""
        while len(found) < limit:
            async with self.client.pipeline(transaction=False) as pipe:
                for p in range(self.partitions):
                    pipe.zrevrangebylex(self.keys.created(p), upper, lower, 0, limit)
                lists = await pipe.execute()
            merged = sorted(
                ((member, p) for p, members in enumerate(lists) for member in members),
                reverse=True,
            )[:limit]
            if not merged:
                return Page(found, "")
            async with self.client.pipeline(transaction=False) as pipe:
                for member, p in merged:
                    pipe.hgetall(self.keys.trans_prefix(p) + member[14:])
                records = await pipe.execute()
            for (member, _p), rec in zip(merged, records, strict=True):
                cursor = member
                if not rec or rec.get("created_member") != member:
                    continue  # expired; the sweeper drops the entry
                if where.status and rec.get("status") != where.status:
                    continue
                if where.trans_type and rec.get("trans_type") != where.trans_type:
                    continue
                try:
                    found.append(trans_from_hash(rec, {}))
                except CorruptRecord:
                    continue  # unreadable: `query` shows its raw fields; a page must not fail
                if len(found) == limit:
                    break
            upper = "(" + cursor
        return Page(found, cursor)

    async def register_branches(
        self, gid: str, branches: Sequence[Branch], *, expected: frozenset[Status], upsert: bool
    ) -> int:
        keys = self.keys.for_gid(gid)
        reply = await self.scripts["register"](
            keys=[keys.trans, keys.branches],
            args=[
                gid,
                ",".join(s.value for s in expected),
                branches_json(branches),
                "upsert" if upsert else "insert",
            ],
        )
        raise_for_reply(reply[0], gid, reply[1] if len(reply) > 1 else "", "register a branch")
        return int(reply[2])

    async def reset_due(self, partition: int, wait_ms: int, limit: int) -> tuple[int, bool]:
        count, remaining = await self.scripts["reset_due"](
            keys=[self.keys.due(partition)], args=[max(0, wait_ms), limit]
        )
        return int(count), remaining == "1"

    async def change_topic(self, subscribe: bool, topic: str, url: str, remark: str) -> None:
        reply = await self.scripts["topic"](
            keys=[self.keys.kv("topics")],
            args=["subscribe" if subscribe else "unsubscribe", topic, url, remark],
        )
        if reply[0] == "EXISTS":
            raise AlreadyExists(topic, f"url {url} is already subscribed")
        if reply[0] == "NOT_FOUND":
            raise NotFound(f"topic {topic!r} has no subscriber {url!r}")

    async def topics(self) -> dict[str, Topic]:
        raw = await self.client.hgetall(self.keys.kv("topics"))
        out: dict[str, Topic] = {}
        for name, value in raw.items():
            rec = orjson.loads(value)
            topic = name.decode() if isinstance(name, bytes) else name
            out[topic] = Topic(topic, orjson.loads(rec["v"]), int(rec["version"]))
        return out

    async def delete_topic(self, topic: str) -> bool:
        return bool(await self.client.hdel(self.keys.kv("topics"), topic))
