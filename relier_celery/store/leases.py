"""Redis commands of the worker leases (lease.py, the scanners): renew, retire, list the
expired.
"""

from __future__ import annotations

from typing import cast

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

    def expired_leases(self) -> dict[str, float]:
        """Workers whose lease deadline has passed (Redis server's clock), with that deadline
        (ms)."""
        flat = self._run("expired", [self.keys.leases], [])
        pairs = zip(flat[::2], flat[1::2], strict=True)
        return {worker: float(deadline) for worker, deadline in pairs}

    def leases(self) -> dict[str, float]:
        """Every known worker with its lease deadline in ms."""
        pairs = self.call(lambda c: c.zrange(self.keys.leases, 0, -1, withscores=True))
        return dict(cast(list[tuple[str, float]], pairs))
