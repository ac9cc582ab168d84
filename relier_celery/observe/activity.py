"""Which held tasks a worker's pool is running, as opposed to reserved (prefetched, ETA).

The registry records a task on receipt; whether it has started is known only to Celery's
worker (its active requests). Rather than add a Redis write per task start (the hot path keeps
one round trip on receipt and one on completion), the heartbeat publishes the set of running
task ids with their start times, only when the set changed since the last heartbeat (and at
least once per lease, to keep the key alive). So the "running" state ``relier inspect`` shows
is at most one heartbeat old; a task that started since then shows as reserved.

With the running set goes the worker's process record (proc.py: pid, host, start time, so
``rl chaos`` can check a pid before it signals it) and how many tasks the worker completed
since it started (the live view's "completed"): still at most one write per heartbeat, never
one per task.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from relier_celery.core import proc
from relier_celery.store.client import Store

__all__ = ["RunningMarker"]


class RunningMarker:
    """Publishes one worker's running set from its heartbeat thread."""

    def __init__(
        self,
        store: Store,
        worker: str,
        lease_ttl: float,
        running: Callable[[], dict[str, float]],
        completed: Callable[[], int] | None = None,
    ) -> None:
        self.store = store
        self.worker = worker
        self.lease_ttl = lease_ttl
        self.running = running
        self.completed = completed
        # Taken once, in the worker's main process (the heartbeat thread runs there).
        self.identity = proc.identity()
        self._last: tuple[dict[str, float], int] | None = None
        self._written_at = 0.0

    def publish(self) -> None:
        """Write the running set if it changed (or is due for a refresh); raises
        StoreUnavailable like every store call."""
        current = self.running()
        done = self.completed() if self.completed is not None else 0
        now = time.monotonic()
        if (current, done) == self._last and now - self._written_at < self.lease_ttl:
            return
        # The key outlives a few leases, so a dead worker's marker does not linger for long.
        process = {**self.identity, "completed": str(done)}
        self.store.set_running(self.worker, current, ttl=3 * self.lease_ttl, process=process)
        self._last = (current, done)
        self._written_at = now
