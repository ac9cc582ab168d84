"""Redis commands of the worker leases (lease.py, the scanners): renew, retire, list the
expired.
"""

from __future__ import annotations

from typing import cast

import redis

from relier_celery.store.connection import Connection, ms

__all__ = ["LeaseCommands"]


class LeaseCommands(Connection):
    """A worker's lease: renewed by its heartbeat, read by every scanner."""

    def renew_lease(self, worker: str, ttl: float) -> tuple[int, int]:
        """Renew a lease; return (previous deadline ms, -1 without one, or -2 when a delivery
        was taken over from this worker; server time ms)."""
        prev, now = self._run(
            "lease_renew", [self.keys.leases, self.keys.taken(worker)], [worker, ms(ttl)]
        )
        return int(prev), int(now)

    def retire(self, worker: str) -> int:
        """A worker stops: forget it, or expire its lease at once if it still holds records."""
        return int(self._run("retire", [self.keys.leases, self.keys.held(worker)], [worker]))

    def expired_workers(self) -> list[str]:
        """Workers whose lease deadline has passed, by the Redis server's clock."""

        def scan(c: redis.Redis) -> list[str]:
            secs, micros = c.time()
            now = secs * 1000 + micros // 1000
            return cast(list[str], c.zrangebyscore(self.keys.leases, "-inf", f"({now}"))

        return self.call(scan)

    def expired_leases(self) -> dict[str, float]:
        """Workers whose lease deadline has passed, with that deadline (ms)."""

        def scan(c: redis.Redis) -> list[tuple[str, float]]:
            secs, micros = c.time()
            now = secs * 1000 + micros // 1000
            return cast(
                list[tuple[str, float]],
                c.zrangebyscore(self.keys.leases, "-inf", f"({now}", withscores=True),
            )

        return dict(self.call(scan))

    def leases(self) -> dict[str, float]:
        """Every known worker with its lease deadline in ms."""
        pairs = self.call(lambda c: c.zrange(self.keys.leases, 0, -1, withscores=True))
        return dict(cast(list[tuple[str, float]], pairs))
