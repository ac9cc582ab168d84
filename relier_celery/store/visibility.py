"""Redis commands of what operators see (observe/snapshot.py, activity.py, counters.py, the
drain status): the running sets, recovery times, counters and the fleet overview.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, cast

import redis

from relier_celery.store.connection import Connection, ms

__all__ = ["DRAIN_RECORD_TTL", "RECOVERY_SAMPLES", "VisibilityCommands"]

# Drain accounting stays readable for a day.
DRAIN_RECORD_TTL = 86400
# Recovery-time samples kept (the live view's p50/p95 read the last hour of them).
RECOVERY_SAMPLES = 1000


class VisibilityCommands(Connection):
    """What the CLI and the exporters read, and what workers write for them."""

    def drain_update(self, worker: str, fields: dict[str, Any]) -> None:
        key = self.keys.drain(worker)

        def write(c: redis.Redis) -> None:
            pipe = c.pipeline(transaction=False)
            pipe.hset(key, mapping={k: str(v) for k, v in fields.items()})
            pipe.expire(key, DRAIN_RECORD_TTL)
            pipe.execute()

        self.call(write)

    def drain_status(self, worker: str) -> dict[str, str]:
        return cast(dict[str, str], self.call(lambda c: c.hgetall(self.keys.drain(worker))))

    def mark_scan(self) -> None:
        self.call(lambda c: c.set(self.keys.scan_stamp, c.time()[0]))

    def set_running(
        self,
        worker: str,
        started: dict[str, float],
        ttl: float,
        process: Mapping[str, str] | None = None,
    ) -> None:
        """Replace the set of tasks a worker's pool runs (task id -> start time, s), and its
        process record (``process``: pid, host, start, completed), in one round trip (MULTI,
        so a reader never sees it half written)."""
        key = self.keys.running(worker)

        def write(c: redis.Redis) -> None:
            pipe = c.pipeline(transaction=True)
            pipe.delete(key)
            # "@": when the set was written, so an empty set still says "nothing runs".
            fields: dict[str | bytes, str | float] = {"@": time.time()}
            fields.update(started)
            pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
            pipe.pexpire(key, ms(ttl))
            if process:
                proc = self.keys.process(worker)
                pipe.hset(proc, mapping=dict(process))  # type: ignore[arg-type]
                pipe.pexpire(proc, ms(ttl))
            pipe.execute()

        self.call(write)

    def add_recovery(self, samples: Sequence[tuple[float, int]]) -> None:
        """Record tasks republished now, ``(last_alive_ms, count)`` per dead worker (Redis
        clock): one sample per task, the list capped."""
        samples = [(alive, n) for alive, n in samples if n > 0]
        if not samples:
            return
        now = self.now_ms()
        values = [f"{now}:{max(int(now - alive), 0)}" for alive, n in samples for _ in range(n)]

        def write(c: redis.Redis) -> None:
            pipe = c.pipeline(transaction=False)
            pipe.lpush(self.keys.recovery, *values)
            pipe.ltrim(self.keys.recovery, 0, RECOVERY_SAMPLES - 1)
            pipe.execute()

        self.call(write)

    def add_counters(self, increments: dict[str, int]) -> None:
        """Add to the fleet-wide event counters (one pipelined round trip)."""

        def write(c: redis.Redis) -> None:
            pipe = c.pipeline(transaction=False)
            for name, n in increments.items():
                pipe.hincrby(self.keys.counters, name, n)
            pipe.execute()

        if increments:
            self.call(write)

    def counters(self) -> dict[str, int]:
        raw = cast(dict[str, str], self.call(lambda c: c.hgetall(self.keys.counters)))
        return {k: int(v) for k, v in raw.items()}

    def overview(self) -> dict[str, Any]:
        """What a registry snapshot starts from, in one pipelined round trip: the server time
        (s), every lease (worker -> deadline ms), the last scan time, the counters and the
        recovery samples ((at, delay) in s)."""

        def read(c: redis.Redis) -> list[Any]:
            pipe = c.pipeline(transaction=False)
            pipe.time()
            pipe.zrange(self.keys.leases, 0, -1, withscores=True)
            pipe.get(self.keys.scan_stamp)
            pipe.hgetall(self.keys.counters)
            pipe.lrange(self.keys.recovery, 0, -1)
            return list(pipe.execute())

        (secs, micros), leases, scan, counters, recovery = self.call(read)
        samples = []
        for item in recovery:
            at, _, delay = str(item).partition(":")
            try:
                samples.append((int(at) / 1000.0, int(delay) / 1000.0))
            except ValueError:
                continue
        return {
            "now": secs + micros / 1e6,
            "leases": dict(leases),
            "last_scan": float(scan) if scan else None,
            "counters": {k: int(v) for k, v in counters.items()},
            "recovery": samples,
        }

    def workers_detail(self, workers: list[str]) -> dict[str, dict[str, Any]]:
        """Per worker: its records, running set, drain progress, scanner claim and process
        record, for every worker in one pipelined round trip."""

        def read(c: redis.Redis) -> list[Any]:
            pipe = c.pipeline(transaction=False)
            for w in workers:
                pipe.hgetall(self.keys.held(w))
                pipe.hgetall(self.keys.running(w))
                pipe.hgetall(self.keys.drain(w))
                pipe.get(self.keys.claim(w))
                pipe.hgetall(self.keys.process(w))
            return list(pipe.execute())

        flat = self.call(read) if workers else []
        n = 5
        return {
            w: {
                "held": flat[n * i],
                "running": {k: float(v) for k, v in flat[n * i + 1].items()},
                "drain": flat[n * i + 2],
                "claim": flat[n * i + 3],
                "process": flat[n * i + 4],
            }
            for i, w in enumerate(workers)
        }
