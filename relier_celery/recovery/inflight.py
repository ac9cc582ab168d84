"""The inflight registry, seen from the worker's main process.

Every task message is recorded in Redis under this worker's lease before Celery sees it (so
before it can be acked), and its record is removed when the delivery reaches a final state.
A delivery already held or finished is a duplicate: it is acked and dropped, never run twice
(G4). If Redis cannot be reached, the message is parked unacked and retried: it stays with
the broker, nothing is lost.
"""

from __future__ import annotations

import logging
from typing import Any

from relier_celery.core.errors import StoreUnavailable
from relier_celery.core.headers import (
    EPOCH_KEY,
    HELD_KEY,
)
from relier_celery.core.record import Generation, TaskRecord, delivery_id
from relier_celery.recovery.receipt import Receiving
from relier_celery.recovery.registry import Key, Pending, Verdict

__all__ = ["Inflight", "Key", "Verdict"]

logger = logging.getLogger("relier_celery")


class Inflight(Receiving):
    """Records received deliveries and forgets finished ones, for one worker."""

    # -- final states -------------------------------------------------------------------
    def to_pool(self, key: Key, request_dict: dict[str, Any], epoch: int) -> bool:
        """A request goes to the pool: False if this worker no longer holds it (given up when
        its lease was lost, or handed off), else stamp what the pool process checks."""
        with self._lock:
            record = self.local.get(key)
            if record is None:
                return False
            request_dict[EPOCH_KEY] = epoch
            # Replaces any HELD_KEY a message carried in. The pool process records the
            # completion: a fetched delivery by its held field, any other by complete.lua.
            if record.field_name is not None:
                request_dict[HELD_KEY] = [self.worker, record.field_name]
            else:
                gen = record.generation
                request_dict[HELD_KEY] = [
                    self.worker,
                    record.held_field(),
                    record.delivery_id,
                    gen.retries,
                    gen.resurrections,
                ]
        return True

    def give_up(self) -> list[TaskRecord]:
        """The lease was lost: raise the lease clock's epoch and forget every held delivery,
        in one step with :meth:`to_pool`, so none of them reaches a pool process as this
        lease's."""
        if self.clock is None:
            raise RuntimeError("give_up needs the worker's lease clock (Registry.clock)")
        with self._lock:
            self.clock.lost()
            records = list(self.local.values())
            self.local.clear()
        return records

    def finish(self, key: Key, in_pool: bool = False) -> None:
        """A delivery reached a final state: remove its record, remember it finished.
        ``in_pool``: its pool process dropped the record already (completion.py)."""
        with self._lock:
            record = self.local.pop(key, None)
            if record is None:
                return
            if self.draining:
                self.drain_completed += 1
            if in_pool:
                self._done_in_pool.append(key)
                return
        self._complete(Pending(key, True, record.field_name))

    def requeued(self, key: Key) -> None:
        """Celery gives the message back to the broker (Reject(requeue=True)): forget the
        delivery without marking it finished, so its next delivery runs. A fetched record is
        moved back to its queue by the transport's reject itself (fetch.py)."""
        with self._lock:
            record = self.local.pop(key, None)
        if record is None or record.field_name is None:
            self._complete(Pending(key, False, None))

    def _complete(self, item: Pending) -> None:
        """One round trip; on a Redis error the completion waits for the heartbeat's flush."""
        try:
            self._store_completion(item)
        except StoreUnavailable as exc:
            self._mark_store_down(exc)
            self._pending.append(item)

    def _store_completion(self, item: Pending) -> None:
        if item.field is not None:  # fetched: its record is the whole footprint
            self.store.ack(self.worker, item.field)
        else:
            self.store.complete(
                item.key.delivery,
                self.worker,
                item.key.generation,
                self.config.completed_ttl,
                item.finished,
            )

    def finish_task(self, task_id: str, headers: dict[str, Any] | None = None) -> None:
        """A revoked (or expired) request: remove its delivery, named by the request's
        ``headers`` (its publication and generation: a replacement waiting under the same
        task id is another delivery), or every delivery of the task id without them."""
        with self._lock:
            if headers is not None:
                delivery = delivery_id(headers, task_id)
                gen = Generation.from_headers(headers)
                keys = [k for k in self.local if k.delivery == delivery and k.generation == gen]
            else:
                keys = [k for k, record in self.local.items() if record.task_id == task_id]
        for key in keys:
            self.finish(key)

    def flush(self) -> None:
        """Retry completions that failed while Redis was unreachable, and drop again what pool
        processes dropped (in case one could not reach Redis): called by the heartbeat."""
        with self._lock:
            done, self._done_in_pool = self._done_in_pool, []
        try:
            fetched = [k.field for k in done if k.field]
            if fetched:
                self.store.ack_many(self.worker, fetched)
            # Kept apart from the broker: completed again (complete.lua) only if still held.
            others = [k for k in done if not k.field]
            fields = [k.generation.field(k.delivery) for k in others]
            for k, held in zip(others, self.store.still_held(self.worker, fields), strict=True):
                if held:
                    self._pending.append(Pending(k, True, None))
        except Exception:
            with self._lock:
                self._done_in_pool[:0] = done
            raise
        while self._pending:
            self._store_completion(self._pending[0])
            self._pending.popleft()

    def worker_lost(self, key: Key) -> str:
        """A pool child died running this delivery: resurrect it now from its record."""
        with self._lock:
            record = self.local.pop(key, None)
        if record is None:
            return "unknown"
        return self.resurrector.resurrect(
            record,
            self.worker,
            record.held_field(),
            "its pool process died (WorkerLostError)",
        )

    def hand_off(
        self,
        only: set[str] | None = None,
        exclude: frozenset[str] | set[str] = frozenset(),
        keep: frozenset[Key] | set[Key] = frozenset(),
        why: str = "its worker shut down before starting it",
    ) -> int:
        """Republish what this worker holds (``only`` those task ids, or all but the task ids
        in ``exclude`` and the deliveries in ``keep``) as a hand-off, which does not count
        against max_resurrections; return how many."""
        count = 0
        for field, raw in self.store.held(self.worker).items():
            try:
                record = TaskRecord.loads(raw, field)
            except (ValueError, KeyError, TypeError) as exc:
                self.resurrector.quarantine_unreadable(self.worker, field, raw, exc)
                continue
            task_id = record.task_id
            key = Key.of_record(record)
            if (only is not None and task_id not in only) or task_id in exclude or key in keep:
                continue
            with self._lock:
                self.local.pop(key, None)
            self.resurrector.resurrect(record, self.worker, field, why, crash=False)
            count += 1
        return count

    def hand_off_stopped(self, key: Key, why: str) -> bool:
        """Hand off a running task the drain (or Celery's cold shutdown) stopped."""
        handed = self.hand_off_key(key, why)
        if handed and self.draining:
            self.drain_stopped += 1
        return handed

    def hand_off_key(self, key: Key, why: str) -> bool:
        """Hand off one delivery this worker holds (from its in-memory record)."""
        with self._lock:
            record = self.local.pop(key, None)
        if record is None:
            return False
        self.resurrector.resurrect(record, self.worker, record.held_field(), why, crash=False)
        return True

    def recover_after_restart(self, running: set[Key]) -> int:
        """After a consumer restart Celery forgets reserved messages: republish them now.

        ``running`` holds the keys of deliveries still executing in the pool (not their task
        ids: a replacement waiting under the id of a task still running must go too); those
        keep their records and finish as usual."""
        return self.hand_off(keep=running, why="the consumer restarted and forgot it")
