"""Orphaned broker deliveries: messages the Redis transport handed to a worker that died before
relier recorded them.

kombu's Redis transport moves a delivered message into its ``unacked`` hash, then calls the
consumer, where relier records it. A worker SIGKILLed between the two leaves the message in
``unacked`` with no relier record, and the transport would only restore it after its
visibility timeout (an hour by default). The sweep restores such a message as soon as it is
older than ``relier_lease_ttl`` and no worker holds or finished that delivery (its task id and
publication, ``record.delivery_id``): every live worker records what it receives within
milliseconds, so an older unrecorded delivery is an orphan. A copy restored twice is
harmless: the second is dropped as a duplicate on receipt.

Only messages of tasks this app knows are touched, so other apps sharing the broker are left
alone; workers without relier on the same queues must not share the broker (their in-flight
messages would look orphaned). ``relier_unacked_sweep = False`` turns the sweep off.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from relier_celery.core import events
from relier_celery.core.config import RelierConfig
from relier_celery.core.record import delivery_id
from relier_celery.store.client import Store

__all__ = ["UnackedSweep"]

logger = logging.getLogger("relier_celery")

# Deliveries looked at per sweep; the rest wait for the next one.
BATCH = 200


class UnackedSweep:
    """Restores orphaned deliveries from kombu's Redis ``unacked`` hash to their queue."""

    def __init__(self, app: Any, config: RelierConfig, store: Store) -> None:
        self.app = app
        self.config = config
        self.store = store
        self._conn: Any = None
        # Workers with the reliable fetch write no unacked entries: nothing of theirs can be
        # orphaned there (a worker whose fetch could not be used turns the sweep back on).
        self.enabled = config.unacked_sweep and not config.reliable_fetch

    def _channel(self) -> Any | None:
        if self._conn is None:
            conn = self.app.connection_for_read()
            if conn.transport.driver_type != "redis":
                conn.release()
                return None
            self._conn = conn
        return self._conn.default_channel

    def close(self) -> None:
        if self._conn is not None:
            self._conn.release()
            self._conn = None

    def sweep(self) -> int:
        """Restore every orphaned delivery found; return how many."""
        if not self.enabled:
            return 0
        try:
            return self._sweep()
        except Exception:
            self.close()  # a fresh connection next time
            raise

    def _sweep(self) -> int:
        channel = self._channel()
        if channel is None:
            return 0
        client = channel.client
        ceiling = time.time() - self.config.lease_ttl
        tags = client.zrangebyscore(channel.unacked_index_key, "-inf", ceiling, start=0, num=BATCH)
        if not tags:
            return 0
        candidates: dict[Any, tuple[str, str, str]] = {}
        for tag, raw in zip(tags, client.hmget(channel.unacked_key, tags), strict=True):
            parsed = _task_of(raw)
            if parsed is not None and parsed[1] in self.app.tasks:
                candidates[tag] = parsed
        known = self.store.known({delivery for _, _, delivery in candidates.values()})
        restored = 0
        for tag, (task_id, name, delivery) in candidates.items():
            if delivery in known:
                continue
            channel.qos.restore_by_tag(tag, client)
            restored += 1
            events.emit(
                events.TASK_ORPHAN_RESTORED,
                f"{name}[{task_id}] was delivered to a worker that died before recording it; "
                "returned to its queue",
                task_id=task_id,
                task_name=name,
            )
        return restored


def _task_of(raw: Any) -> tuple[str, str, str] | None:
    """(task id, task name, delivery id) of a kombu ``unacked`` entry, or None if it is not a
    Celery task."""
    if raw is None:
        return None
    try:
        message = json.loads(raw)[0]
        headers = message.get("headers") or {}
        task_id = str(headers["id"])
        return task_id, str(headers["task"]), delivery_id(headers, task_id)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
