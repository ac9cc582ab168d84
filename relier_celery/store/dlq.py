"""Redis commands of the dead-letter queue (recovery/dlq.py)."""

from __future__ import annotations

from typing import cast

import redis

from relier_celery.core.record import Generation
from relier_celery.store.connection import Connection, ms

__all__ = ["DlqCommands"]


class DlqCommands(Connection):
    """Entries of the dead-letter queue."""

    def dlq_put(
        self,
        entry_id: str,
        entry: str,
        at_ms: int,
        delivery: str,
        gen: Generation,
        done_ttl: float,
        worker: str | None = None,
        field: str | None = None,
    ) -> None:
        """Write a DLQ entry and, in the same step, drop the record it came from (and, by its
        delivery id, its owner entry; its done record makes a late copy a duplicate)."""
        k = self.keys
        self._run(
            "dlq_put",
            [k.dlq, k.dlq_index, k.held(worker or "-"), k.done(delivery), k.owners],
            [
                entry_id,
                entry,
                at_ms,
                field or "",
                f"{gen.retries}|{gen.resurrections}",
                ms(done_ttl),
                delivery,
                f"{worker}|{gen.retries}|{gen.resurrections}" if worker else "",
            ],
        )

    def dlq_entries(self) -> dict[str, str]:
        return cast(dict[str, str], self.call(lambda c: c.hgetall(self.keys.dlq)))

    def dlq_get(self, entry_id: str) -> str | None:
        return cast(str | None, self.call(lambda c: c.hget(self.keys.dlq, entry_id)))

    def dlq_remove(self, entry_ids: list[str]) -> int:
        """Remove entries (after a release or a purge); return how many were there."""
        if not entry_ids:
            return 0
        k = self.keys

        def remove(c: redis.Redis) -> int:
            pipe = c.pipeline(transaction=True)
            pipe.hdel(k.dlq, *entry_ids)
            pipe.zrem(k.dlq_index, *entry_ids)
            return int(pipe.execute()[0])

        return self.call(remove)

    def dlq_older_than(self, at_ms: int, limit: int = 1000) -> list[str]:
        """Ids of entries quarantined before ``at_ms`` (oldest first)."""
        return cast(
            list[str],
            self.call(
                lambda c: c.zrangebyscore(self.keys.dlq_index, "-inf", at_ms, start=0, num=limit)
            ),
        )
