"""What the store costs Redis per two-step saga: its create and finish, and later its sweep.

The bench's scenarios measure the Redis time of transactions while they run; the sweep
that drops their listing entries runs a finished TTL later (a day by default), outside
any run. This drives the store directly, on a private redis-server kept like the
bench's (AOF, `appendfsync everysec`, no rewrite during the run), with a finished TTL
of a few seconds:

    python -m bench.store_cost --transactions 20000 [--rounds 2] [--at-once 16]

For each round it creates and finishes the transactions (`--at-once` of them at a
time, through the store's batching as the engine uses it: the fewer at once, the fewer
scripts share a call), waits until they have expired, sweeps every partition until a
pass drops nothing, and prints the µs Redis spent per transaction in each phase (INFO
commandstats: the script calls, and the reads the store sends by themselves), which
commands ran inside the scripts and for how long, and the memory a finished
transaction held. To measure another revision's store, run this file with that
revision's source tree first on PYTHONPATH:

    PYTHONPATH=/path/to/other/checkout python bench/store_cost.py

Times vary with whatever else the machine runs. `--callgrind` runs the redis-server
under valgrind's callgrind instead and counts the instructions it executes for the
create and finish (no sweep): the same count for the same build and work, whatever
else the machine is doing, so two stores compare on a noisy machine too (slowly: use
a few thousand transactions).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import coordinator
from coordinator.keys import KeySpace
from coordinator.machines.saga import branches_for
from coordinator.model import BranchStatus, Options, Status, Trans, stamped
from coordinator.store.base import Transition
from coordinator.store.redis_store import RedisStore

PARTITIONS = 63
TTL_S = 3
MAX_SWEEP_PASSES = 1_000


# Commandstats count a command run inside a script twice: in its own line and in the
# script call's. The store sends these reads by themselves (the due candidates, a sweep's
# chunk of a bucket) and everything else as scripts.
_SENT_ALONE = ("cmdstat_zrangebyscore", "cmdstat_zrangebylex")


def _command_usec(stats: dict[str, Any]) -> int:
    """Redis's time in the store's calls: its scripts, and the reads it sends alone."""
    return sum(int(stats[k]["usec"]) for k in ("cmdstat_evalsha", *_SENT_ALONE) if k in stats)


def _inner_usec(stats: dict[str, Any], n: int) -> dict[str, float]:
    """µs per transaction of each command but the script calls themselves."""
    out = {k[len("cmdstat_"):]: int(v["usec"]) / n for k, v in stats.items()
           if k.startswith("cmdstat_") and k != "cmdstat_evalsha"}
    return {k: v for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 0.05}


async def measure(
    socket: str, transactions: int, lanes: int, sweep: bool,
    around: tuple[Callable[[], None], Callable[[], None]] | None = None, ttl_s: int = TTL_S,
) -> dict[str, Any]:
    """`around`: called just before the first create and just after the last finish."""
    # A key prefix of its own per round: a round's buckets are new, as a run's would be.
    run = uuid.uuid4().hex[:8]
    store = RedisStore.from_url(f"unix://{socket}", KeySpace(f"cost{run}", PARTITIONS),
                                finished_ttl_s=ttl_s)
    await store.start()
    try:
        steps = ({"action": "", "compensate": ""}, {"action": "", "compensate": ""})
        branches = branches_for(steps)
        template = Trans(gid="", trans_type="saga", status=Status.SUBMITTED, steps=steps,
                         payloads=("{}", "{}"), branches=branches,
                         options=Options(wait_result=True))
        # The finish sends the branch as the engine holds it after its create.
        last = stamped(branches, int(time.time() * 1000))[3]
        per_lane = transactions // lanes

        async def lane(k: int) -> None:
            for i in range(per_lane):
                gid, token = f"{run}-{k}-{i}", f"cost:{k}"
                await store.create(replace(template, gid=gid), due_in_ms=0, owner=token)
                await store.transition(gid, Transition(
                    expected=frozenset({Status.SUBMITTED}), new_status=Status.SUCCEED,
                    owner=token, lease="renew", branch_updates={last.key: BranchStatus.SUCCEED},
                    records={last.key: last}))

        n = per_lane * lanes
        await store.client.config_resetstat()
        if around:
            around[0]()
        await asyncio.gather(*(lane(k) for k in range(lanes)))
        if around:
            around[1]()
        stats = await store.client.info("commandstats")
        write = _command_usec(stats) / n
        scripts = int(stats["cmdstat_evalsha"]["usec"]) / n
        calls = int(stats["cmdstat_evalsha"]["calls"]) / n
        inner = _inner_usec(stats, n)
        memory = int((await store.client.info("memory"))["used_memory"]) / n
        if not sweep:
            return {"transactions": n, "create_finish_us": write, "script_us": scripts,
                    "script_calls": calls, "inside_scripts_us": inner, "sweep_us": 0.0,
                    "entries_swept": 0, "memory_bytes": memory}
        await asyncio.sleep(ttl_s + 1.5)
        await store.client.config_resetstat()
        removed = 0
        for _ in range(MAX_SWEEP_PASSES):
            dropped = sum([await store.sweep(p) for p in range(PARTITIONS)])
            removed += dropped
            if removed and not dropped:
                break
        sweep_us = _command_usec(await store.client.info("commandstats")) / n
        return {"transactions": n, "create_finish_us": write, "script_us": scripts,
                "script_calls": calls, "inside_scripts_us": inner, "sweep_us": sweep_us,
                "entries_swept": removed, "memory_bytes": memory}
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.store_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transactions", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--at-once", type=int, default=16, help="transactions in flight")
    p.add_argument("--no-sweep", action="store_true",
                   help="measure the create and finish only (for script variants whose "
                        "listing the sweep cannot read)")
    p.add_argument("--callgrind", action="store_true",
                   help="count the instructions redis-server runs for the create and "
                        "finish, under valgrind (implies --no-sweep)")
    args = p.parse_args(argv)
    if args.callgrind and not shutil.which("valgrind"):
        print("--callgrind needs valgrind (Debian package valgrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as data:
        socket = os.path.join(data, "redis.sock")
        profile = os.path.join(data, "callgrind.out")
        command = ["redis-server", "--port", "0", "--unixsocket", socket, "--dir", data,
                   "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                   "--auto-aof-rewrite-min-size", "64gb"]
        if args.callgrind:
            command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={profile}",
                       *command]
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        counter = _Instructions(server.pid, profile) if args.callgrind else None
        try:
            deadline = time.monotonic() + (60 if args.callgrind else 10)
            while not os.path.exists(socket):
                if time.monotonic() > deadline or server.poll() is not None:
                    print("redis-server did not start", file=sys.stderr)
                    return 1
                time.sleep(0.05)
            print(f"store of {os.path.dirname(coordinator.__file__)}")
            for _ in range(args.rounds):
                if counter:
                    # Kept an hour: no earlier round's expiry is counted in a later one.
                    r = asyncio.run(measure(socket, args.transactions, args.at_once, False,
                                            (counter.zero, counter.dump), ttl_s=3_600))
                    print(f"{r['transactions']:,} sagas, {args.at_once} at once: create + "
                          f"finish {counter.total / r['transactions']:,.0f} instructions "
                          f"per saga in redis-server ({r['script_calls']:.2f} script calls "
                          f"per saga)")
                    continue
                r = asyncio.run(measure(socket, args.transactions, args.at_once, not args.no_sweep))
                inside = ", ".join(f"{k} {v:.2f}" for k, v in r["inside_scripts_us"].items())
                print(f"{r['transactions']:,} sagas, {args.at_once} at once: create + finish "
                      f"{r['create_finish_us']:.1f} µs per saga, of which scripts "
                      f"{r['script_us']:.1f} ({r['script_calls']:.2f} script calls per "
                      f"saga; the commands inside: {inside}); sweep {r['sweep_us']:.1f} µs "
                      f"({r['entries_swept']:,} entries dropped); "
                      f"{r['memory_bytes']:,.0f} bytes each before expiry")
        finally:
            server.terminate()
            server.wait(timeout=10)
    return 0


class _Instructions:
    """Instructions counted by callgrind in the redis-server `pid` since `zero`, read
    from the profile `dump` writes."""

    def __init__(self, pid: int, profile: str) -> None:
        self.pid, self.profile, self.total = pid, profile, 0

    def zero(self) -> None:
        subprocess.run(["callgrind_control", "-z", str(self.pid)], check=True,
                       capture_output=True, timeout=60)

    def dump(self) -> None:
        subprocess.run(["callgrind_control", "-d", str(self.pid)], check=True,
                       capture_output=True, timeout=60)
        # Each dump is a file of its own, <profile>.<n>; its totals line counts all.
        newest = max(glob.glob(self.profile + ".*"), key=os.path.getmtime)
        with open(newest) as f:
            for line in f:
                if line.startswith(("summary:", "totals:")):
                    self.total = int(line.split()[1])


if __name__ == "__main__":
    sys.exit(main())
