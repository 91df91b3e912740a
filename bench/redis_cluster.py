"""A private Redis Cluster for tests and benchmarks: N primaries with replicas, on free
loopback ports.

Each node is a plain ``redis-server --cluster-enabled yes`` in a temporary directory,
joined by ``redis-cli --cluster create … --cluster-replicas 1``. A small
``cluster-node-timeout`` makes a killed primary's replica take over within seconds.
Ports are below 45000 and each node's bus port (port + 10000) is checked free too.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import redis

NODE_TIMEOUT_MS = 1000


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_ports(count: int) -> list[int]:
    """`count` ports below 45000 whose bus ports (port + 10000) are free as well."""
    rng = random.Random()
    ports: list[int] = []
    for _ in range(2000):
        port = rng.randrange(20000, 44990)
        if port in ports or port + 10000 in ports:
            continue
        if _free(port) and _free(port + 10000):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError("no free ports for a test cluster")


def have_cluster_tools() -> bool:
    return bool(shutil.which("redis-server") and shutil.which("redis-cli"))


@dataclass
class RedisClusterProcess:
    """Starts, inspects and stops one test cluster."""

    primaries: int = 3
    replicas_per_primary: int = 1
    node_timeout_ms: int = NODE_TIMEOUT_MS
    ports: list[int] = field(default_factory=list)
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    dir: str = ""

    @property
    def url(self) -> str:
        """A single seed: redis-py discovers the rest of the cluster from it."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    @property
    def seeds_url(self) -> str:
        """Every node as a comma-separated seed list."""
        return "redis://" + ",".join(f"127.0.0.1:{p}" for p in self.ports) + "/0"

    def start(self) -> RedisClusterProcess:
        count = self.primaries * (1 + self.replicas_per_primary)
        self.ports = free_cluster_ports(count)
        self.dir = tempfile.mkdtemp(prefix="coord-cluster-")
        try:
            for port in self.ports:
                self.start_node(port)
            for port in self.ports:
                self._wait_ping(port)
            subprocess.run(
                ["redis-cli", "--cluster", "create",
                 *(f"127.0.0.1:{p}" for p in self.ports),
                 "--cluster-replicas", str(self.replicas_per_primary), "--cluster-yes"],
                check=True, capture_output=True, timeout=60,
            )
            self.wait_ok()
            self.wait_replicas_synced()
        except BaseException:
            self.stop()
            raise
        return self

    def start_node(self, port: int) -> None:
        node_dir = os.path.join(self.dir, str(port))
        os.makedirs(node_dir, exist_ok=True)
        log = open(os.path.join(node_dir, "redis.log"), "ab")  # noqa: SIM115 - child owns it
        self.procs[port] = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes",
             "--cluster-config-file", os.path.join(node_dir, "nodes.conf"),
             "--cluster-node-timeout", str(self.node_timeout_ms),
             # A replica always may take over, however long it was cut off.
             "--cluster-replica-validity-factor", "0",
             # Replicas sync at once (the default waits 5 s for more replicas to join).
             "--repl-diskless-sync-delay", "0",
             "--save", "", "--appendonly", "no", "--dir", node_dir,
             "--protected-mode", "no"],
            stdout=log, stderr=subprocess.STDOUT, cwd=node_dir,
        )
        log.close()

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, decode_responses=True,
                           socket_timeout=5, socket_connect_timeout=2)

    def _wait_ping(self, port: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.client(port) as c:
                    if c.ping():
                        return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.05)

    def alive(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.poll() is None]

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node reports cluster_state:ok and agrees on the primaries."""
        deadline = time.monotonic() + timeout
        while True:
            states = []
            for port in self.alive():
                try:
                    with self.client(port) as c:
                        info = c.execute_command("CLUSTER", "INFO")
                        states.append("cluster_state:ok" in info)
                except redis.RedisError:
                    states.append(False)
            if states and all(states) and len(self.primary_ports()) == self.primaries:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not ok within {timeout}s")
            time.sleep(0.1)

    def nodes(self) -> list[dict[str, str]]:
        """CLUSTER NODES of the first live node, one dict per node."""
        for port in self.alive():
            try:
                with self.client(port) as c:
                    raw = c.execute_command("CLUSTER", "NODES")
            except redis.RedisError:
                continue
            text = raw if isinstance(raw, str) else "\n".join(
                f"{v['node_id']} {k} {v['flags']} {v['master_id']} - - - {v['connected']}"
                for k, v in raw.items()
            )
            out = []
            for line in text.strip().splitlines():
                parts = line.split()
                out.append({"id": parts[0], "addr": parts[1].split("@")[0],
                            "flags": parts[2], "master": parts[3],
                            "slots": " ".join(parts[8:])})
            return out
        raise RuntimeError("no cluster node answers")

    def primary_ports(self) -> list[int]:
        alive = set(self.alive())
        return sorted(
            int(n["addr"].rsplit(":", 1)[1]) for n in self.nodes()
            if "master" in n["flags"] and "fail" not in n["flags"] and n["slots"]
            and int(n["addr"].rsplit(":", 1)[1]) in alive
        )

    def port_of_slot(self, slot: int) -> int:
        """The live primary that serves `slot`, as the cluster's view says."""
        alive = set(self.alive())
        for n in self.nodes():
            port = int(n["addr"].rsplit(":", 1)[1])
            if "master" not in n["flags"] or "fail" in n["flags"] or port not in alive:
                continue
            for part in n["slots"].split():
                if part.startswith("["):
                    continue  # a migrating/importing marker
                lo, _, hi = part.partition("-")
                if int(lo) <= slot <= int(hi or lo):
                    return port
        raise LookupError(f"no primary serves slot {slot}")

    def wait_replicas_synced(self, timeout: float = 30.0) -> None:
        """Until every primary sees its replicas online (full sync done)."""
        deadline = time.monotonic() + timeout
        while True:
            ready = True
            for port in self.primary_ports():
                with self.client(port) as c:
                    info = c.info("replication")
                online = [k for k, v in info.items()
                          if k.startswith("slave") and isinstance(v, dict)
                          and v.get("state") == "online"]
                if len(online) < self.replicas_per_primary:
                    ready = False
            if ready:
                return
            if time.monotonic() > deadline:
                raise TimeoutError("replicas did not connect")
            time.sleep(0.1)

    def kill(self, port: int) -> None:
        """SIGKILL one node: no shutdown, no last write to its replicas."""
        proc = self.procs[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs.clear()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
