"""A real Redis Sentinel group on loopback ports: a primary, a replica and three sentinels,
started and stopped by the test that needs it (``redis-server --sentinel``)."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import redis

from relier_celery.testing import RedisServer, find_redis_server, free_port, wait_for

MASTER = "mymaster"


class SentinelGroup:
    def __init__(self) -> None:
        self.primary = RedisServer()
        self.replica: RedisServer | None = None
        self.sentinels: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []
        self._dir = tempfile.TemporaryDirectory(prefix="relier-sentinel-")

    @property
    def url(self) -> str:
        """kombu's spelling of the whole group."""
        return ";".join(f"sentinel://127.0.0.1:{p}/0" for p in self.ports)

    def start(self) -> SentinelGroup:
        self.primary.start()
        self.replica = RedisServer("--replicaof", "127.0.0.1", str(self.primary.port))
        self.replica.start()
        wait_for(lambda: self._linked(self.replica), 15, what="the replica to sync")
        for i in range(3):
            port = free_port()
            conf = Path(self._dir.name) / f"sentinel{i}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self._dir.name}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} 1000\n"
                f"sentinel failover-timeout {MASTER} 5000\n"
            )
            self.sentinels.append(
                subprocess.Popen(
                    [find_redis_server(), str(conf), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            self.ports.append(port)
        wait_for(self._agreed, 20, what="three sentinels that know each other and the replica")
        return self

    @staticmethod
    def _linked(server: RedisServer | None) -> bool:
        assert server is not None
        info = redis.Redis.from_url(server.url).info("replication")
        return info.get("master_link_status") == "up"

    def _agreed(self) -> bool:
        try:
            for port in self.ports:
                s = redis.Redis(port=port, decode_responses=True, socket_timeout=1)
                state = s.sentinel_master(MASTER)
                if int(state["num-other-sentinels"]) < 2 or int(state["num-slaves"]) < 1:
                    return False
        except redis.RedisError:
            return False
        return True

    def master_port(self) -> int:
        s = redis.Redis(port=self.ports[0], decode_responses=True, socket_timeout=1)
        return int(s.sentinel_get_master_addr_by_name(MASTER)[1])

    def replicate_now(self) -> None:
        """Block until the replica has every write the primary acknowledged so far."""
        c = redis.Redis.from_url(self.primary.url)
        c.set("test:wait", 1)
        assert int(c.execute_command("WAIT", 1, 5000)) >= 1

    def kill_primary(self) -> None:
        assert self.primary.proc is not None
        self.primary.proc.kill()
        self.primary.proc.wait(5)

    def stop(self) -> None:
        for proc in self.sentinels:
            proc.kill()
            proc.wait(5)
        for server in (self.replica, self.primary):
            if server is not None:
                server.stop()
        self._dir.cleanup()
