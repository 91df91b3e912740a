"""The Redis key layout, in one place.

Every key of one transaction carries the same hash tag, ``{pN}``, where N is the
transaction's partition. The partition's due-index and listing index carry the same
tag, so a transition that touches the transaction and the indexes is one script in one
slot, and the same code runs on Redis Cluster: partitions spread over its nodes.

A participant that keeps its own data in this Redis (flash-sale stock) co-locates it
with its transactions by using the partition's tag in its keys and a gid that names
the partition explicitly, written like a Redis hash tag: ``{3}order-42``.
"""

from __future__ import annotations

import functools
import re
import zlib
from dataclasses import dataclass

# Branch records live in the transaction hash under "branch:<branch_id>:<op>"; no
# transaction field name contains ':', so the two never clash.
BRANCH_FIELD = "branch:"

# The due index holds one entry per transaction, its listing member
# "<13-digit create ms>:<gid>". An unfinished one is scored by when it is next due (ms);
# a finished one by FINISHED_BAND + when its hash expires, so that the two never mix:
# claims look below the band, the sweep inside it. Unfinished scores stay far below (the
# API bounds every interval to 100 years); band scores stay exact doubles (< 2**53).
# lua/lib_band.lua holds the same number.
FINISHED_BAND = 2**50

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


@dataclass(frozen=True)
class TransKeys:
    """The keys of one transaction, in the order every transition script takes them."""

    trans: str
    due: str
    created: str

    def as_list(self) -> list[str]:
        return [self.trans, self.due, self.created]


@dataclass(frozen=True)
class KeySpace:
    """Builds key names for one deployment (one prefix, one partition count)."""

    prefix: str = "coord"
    partitions: int = 16

    def partition(self, gid: str) -> int:
        return partition_of(gid, self.partitions)

    def _build(self, p: int) -> tuple[str, str, str]:
        """A partition's transaction key prefix, due index and listing index."""
        return (f"{self.prefix}:trans:{tag(p)}:", f"{self.prefix}:due:{tag(p)}",
                f"{self.prefix}:created:{tag(p)}")

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

    def created(self, partition: int) -> str:
        return self._names(partition)[2]

    def legacy_expiry(self, partition: int) -> str:
        """The index of finished transactions of layouts 1 and 2; the due index's
        finished band holds them since."""
        return f"{self.prefix}:expiry:{tag(partition)}"

    def for_gid(self, gid: str) -> TransKeys:
        return TransKeys(*self.trans_keys(gid))

    def trans_keys(self, gid: str) -> list[str]:
        """`for_gid(gid).as_list()`, the KEYS of every transition script, in one step."""
        trans, due, created = self._named[partition_of(gid, self.partitions)]
        return [trans + gid, due, created]

    def partition_keys(self, partition: int) -> list[str]:
        """KEYS for the per-partition scripts (claim, sweep)."""
        return list(self._names(partition)[1:])

    def kv(self, cat: str) -> str:
        """Key-value records (topics); small and global, kept in one slot."""
        return f"{self.prefix}:kv:{{kv}}:{cat}"
