"""The Redis key layout, in one place.

Every key of one transaction carries the same hash tag, ``{pN}``, where N is the
transaction's partition. The partition's due index and listing keys carry the same
tag, so a transition that touches the transaction and the indexes is one script in one
slot, and the same code runs on Redis Cluster: partitions spread over its nodes.

The listing is kept per partition and minute of creation (a "bucket"), not in one
sorted set of every transaction kept: an insert into the small sorted set of the
current minute costs Redis less than one into a set that holds a day of transactions,
and the sweep takes a minute's entries together once their transactions have expired.

A participant that keeps its own data in this Redis (flash-sale stock) co-locates it
with its transactions by using the partition's tag in its keys and a gid that names
the partition explicitly, written like a Redis hash tag: ``{3}order-42``.
"""

from __future__ import annotations

import calendar
import functools
import re
import time
import zlib
from dataclasses import dataclass

# Branch records live in the transaction hash under "branch:<branch_id>:<op>"; no
# transaction field name contains ':', so the two never clash.
BRANCH_FIELD = "branch:"
# The transaction as its client sent it (type, steps, payloads, options, the branches'
# layout, ...), fixed from its create on: one JSON field, since every hash field costs
# Redis an argument, an entry and AOF text on each write. A branch of it gets a field of
# its own only once its status changes, and that field holds just its state.
SPEC_FIELD = "spec"

# The due index holds one entry per unfinished transaction, its listing member
# "<13-digit create ms>:<gid>", scored by when it is next due (ms); a transaction leaves
# it when it finishes. Above FINISHED_BAND it holds the sweep's schedule instead: one
# entry per listing bucket, named by the bucket's minute ("YYYYMMDDHHMM", UTC) and scored
# FINISHED_BAND + when the sweep should next look at it, so that the two never mix:
# claims look below the band, the sweep inside it. Unfinished scores stay far below (the
# API bounds every interval to 100 years); band scores stay exact doubles (< 2**53).
# lua/lib_band.lua holds the same number.
FINISHED_BAND = 2**50

MINUTE_MS = 60_000

_EXPLICIT = re.compile(r"\{(\d{1,5})\}")
_GLOB = re.compile(r"[*?\[\]\\]")


def partition_of(gid: str, partitions: int) -> int:
    """The partition a gid belongs to: an explicit ``{N}`` tag if present, else a hash."""
    # The regex only when a brace is there: most gids have none, and this runs for
    # every key of every script call.
    match = _EXPLICIT.search(gid) if "{" in gid else None
    if match is not None and int(match.group(1)) < partitions:
        return int(match.group(1))
    return zlib.crc32(gid.encode()) % partitions


def tag(partition: int) -> str:
    """The hash tag shared by all keys of one partition."""
    return f"{{p{partition}}}"


@functools.lru_cache(maxsize=256)
def minute_label(minute: int) -> str:
    """A listing bucket's name for the minute `minute` (ms // 60,000): "YYYYMMDDHHMM",
    UTC, so that a person with redis-cli reads when its transactions were created."""
    return time.strftime("%Y%m%d%H%M", time.gmtime(minute * 60))


def label_minute(label: str) -> int:
    """The minute (ms // 60,000) a bucket label names; ValueError if it names none."""
    if len(label) != 12 or not label.isdigit():
        raise ValueError(f"not a listing bucket label: {label!r}")
    return calendar.timegm(time.strptime(label, "%Y%m%d%H%M")) // 60


def member_minute(member: str) -> int:
    """The minute of a listing member "<13-digit create ms>:<gid>": its bucket's."""
    return int(member[:13]) // MINUTE_MS


@dataclass(frozen=True)
class TransKeys:
    """The keys of one transaction, in the order every transition script takes them."""

    trans: str
    due: str

    def as_list(self) -> list[str]:
        return [self.trans, self.due]


@dataclass(frozen=True)
class KeySpace:
    """Builds key names for one deployment (one prefix, one partition count)."""

    prefix: str = "coord"
    partitions: int = 16

    def partition(self, gid: str) -> int:
        return partition_of(gid, self.partitions)

    def _build(self, p: int) -> tuple[str, str, str]:
        """A partition's transaction key prefix, due index and listing bucket prefix."""
        return (f"{self.prefix}:trans:{tag(p)}:", f"{self.prefix}:due:{tag(p)}",
                f"{self.prefix}:created:{tag(p)}:")

    @functools.cached_property
    def _named(self) -> tuple[tuple[str, str, str], ...]:
        # Every script call names a transaction's keys; built once per partition here
        # rather than by three f-strings per call. (A frozen dataclass without slots
        # keeps a cached_property in its instance dict.)
        return tuple(self._build(p) for p in range(self.partitions))

    def _names(self, p: int) -> tuple[str, str, str]:
        return self._named[p] if 0 <= p < self.partitions else self._build(p)

    def trans_prefix(self, partition: int) -> str:
        """What a transaction key starts with; scripts append the gid."""
        return self._names(partition)[0]

    def legacy_branches_pattern(self) -> str:
        """SCAN pattern of the branch hashes of layout 1, which kept each transaction's
        branches in a second key; start-up moves them into the transaction hash."""
        return _GLOB.sub(r"\\\g<0>", self.prefix) + ":branches:*"

    def legacy_trans_key(self, branches_key: str) -> str:
        """The transaction hash a layout-1 branch hash belongs to (same tag, same gid)."""
        return f"{self.prefix}:trans:" + branches_key[len(self.prefix) + len(":branches:"):]

    def due(self, partition: int) -> str:
        return self._names(partition)[1]

    def bucket(self, partition: int, label: str) -> str:
        """The listing bucket of one partition and minute: a sorted set of the listing
        members of the transactions created in that minute (scores 0, so that it sorts
        by member: by creation time, then gid)."""
        return self._names(partition)[2] + label

    def bucket_prefix(self, partition: int) -> str:
        return self._names(partition)[2]

    def minutes(self, partition: int) -> str:
        """The partition's index of listing buckets: member = label, score = minute."""
        return f"{self.prefix}:minutes:{tag(partition)}"

    def legacy_created(self, partition: int) -> str:
        """The listing index of layout 3: one sorted set of every transaction kept."""
        return f"{self.prefix}:created:{tag(partition)}"

    def legacy_expiry(self, partition: int) -> str:
        """The index of finished transactions of layouts 1 and 2 (layout 3 kept them in
        the due index's band; layout 4 keeps no index of them)."""
        return f"{self.prefix}:expiry:{tag(partition)}"

    def for_gid(self, gid: str) -> TransKeys:
        return TransKeys(*self.trans_keys(gid))

    def trans_keys(self, gid: str) -> list[str]:
        """`for_gid(gid).as_list()`, the KEYS of every transition script, in one step."""
        trans, due, _ = self._named[partition_of(gid, self.partitions)]
        return [trans + gid, due]

    def kv(self, cat: str) -> str:
        """Key-value records (topics); small and global, kept in one slot."""
        return f"{self.prefix}:kv:{{kv}}:{cat}"
