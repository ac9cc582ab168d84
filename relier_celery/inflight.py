"""The inflight registry, seen from the worker's main process.

Every task message is recorded in Redis under this worker's lease before Celery sees it (so
before it can be acked), and its record is removed when the delivery reaches a final state.
A delivery already held or finished is a duplicate: it is acked and dropped, never run twice
(G4). If Redis cannot be reached, the message is parked unacked and retried: it stays with
the broker, nothing is lost.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from . import envelope, events
from .config import RelierConfig
from .dlq import quarantine
from .errors import StoreUnavailable
from .presence import PresenceCache
from .record import (
    CRASHES_HEADER,
    EPOCH_KEY,
    FETCH_FIELD,
    FETCH_QUEUE,
    HELD_KEY,
    Generation,
    TaskRecord,
    as_int,
    delivery_id,
    trace_context,
)
from .resurrect import Resurrector
from .store import Receipt, Store

__all__ = ["Inflight", "Verdict"]

logger = logging.getLogger("relier_celery")

Verdict = Literal["run", "duplicate", "parked", "quarantined", "deferred"]


class Key(NamedTuple):
    """One delivery this worker holds, in memory. Two deliveries of one task id can be in one
    worker at once: a task that replaced itself still runs (it raises Ignore after publishing)
    when its replacement, under the same id, arrives. So the key is the delivery id (task id
    and publication), its generation and, for a fetched delivery, its held field (unique per
    fetch, so even two messages that carry no publication id stay apart)."""

    delivery: str
    generation: Generation
    field: str = ""

    @classmethod
    def of(cls, headers: dict[str, Any], info: Any = None) -> Key:
        """The key of a message by its headers and delivery_info."""
        field = info.get(FETCH_FIELD) if isinstance(info, dict) else None
        return cls(
            delivery_id(headers, str(headers["id"])),
            Generation.from_headers(headers),
            "" if field is None else str(field),
        )

    @classmethod
    def of_record(cls, record: TaskRecord) -> Key:
        return cls(record.delivery_id, record.generation, record.field_name or "")


@dataclass
class _Pending:
    key: Key
    finished: bool
    field: str | None  # set for a fetched delivery: its completion is dropping this field


class Inflight:
    """Records received deliveries and forgets finished ones, for one worker."""

    def __init__(
        self, config: RelierConfig, store: Store, worker: str, resurrector: Resurrector
    ) -> None:
        self.config = config
        self.store = store
        self.worker = worker
        self.resurrector = resurrector
        self.presence = PresenceCache(store)
        self.local: dict[Key, TaskRecord] = {}
        self._lock = threading.Lock()
        self._pending: deque[_Pending] = deque()
        self._store_down = False
        self.draining = False
        self.drain_completed = 0
        self.drain_stopped = 0  # running tasks the drain stopped, handed off as they ended
        # Held fields of fetched deliveries whose pool process dropped the record itself when
        # the task succeeded (completion.py); dropped again, in one batch, by the heartbeat.
        self._done_in_pool: list[str] = []
        self.accept = envelope.accepted(resurrector.app)

    # -- receipt ------------------------------------------------------------------------
    def receive(self, message: Any, known_tasks: Any) -> Verdict:
        """Decide what happens to one incoming message."""
        headers = message.headers
        if not isinstance(headers, dict) or "task" not in headers:
            return self._receive_other(message)
        try:
            envelope.check_headers(headers)
        except envelope.BadMessage as bad:
            return self._quarantine_unrecorded(envelope.raw_record_of(message, self.worker), bad)
        record = TaskRecord.from_message(message, self.worker)
        info = message.delivery_info or {}
        if FETCH_FIELD in info:  # a quarantine then drops its held field in the same step
            record.field_name = str(info[FETCH_FIELD])
        if record.task_name not in known_tasks:
            verdict = self._quarantine_unrecorded(
                record,
                envelope.BadMessage(
                    "unknown_task",
                    f"no task named {record.task_name!r} is registered on worker {self.worker}",
                ),
            )
            # Celery then rejects it and marks the result as failed, as usual.
            return "parked" if verdict == "parked" else "run"
        try:
            args, kwargs, embed = envelope.decode_body(
                message.body, message.content_type, message.content_encoding, self.accept
            )
        except envelope.BadMessage as bad:
            return self._quarantine_unrecorded(record, bad)
        if FETCH_FIELD in info:
            # The reliable fetch took it from its queue into this worker's held hash already.
            record.field_name = str(info[FETCH_FIELD])
            record.queue_key = str(info[FETCH_QUEUE])
            record.delivery_tag = str(message.delivery_tag)
            key = Key.of_record(record)
            with self._lock:
                self.local[key] = record
            return self._check_schema(key, record, message, args, kwargs, embed)
        if len(record.body) > self.config.max_message_bytes:
            events.emit(
                "task.unprotected",
                f"{record.task_name}[{record.task_id}] body is {len(record.body)} bytes, "
                f"above relier_max_message_bytes={self.config.max_message_bytes}: it runs "
                "without a record and will NOT be resurrected if this worker dies",
                task_id=record.task_id,
                task_name=record.task_name,
                worker=self.worker,
            )
            return "run"
        gen = record.generation
        try:
            receipt = self.store.record(record.delivery_id, self.worker, gen, record.dumps())
            seen = receipt.detail
            taken = receipt.reason == "held" and self._take_over(message, record, seen)
            if taken:
                receipt = Receipt(True)
        except StoreUnavailable as exc:
            self._mark_store_down(exc)
            return "parked"
        self._mark_store_up()
        if not receipt.recorded:
            events.emit(
                "task.duplicate_dropped",
                f"{record.task_name}[{record.task_id}] delivery {gen.retries}|"
                f"{gen.resurrections} is not newer than the one {receipt.reason} "
                f"({receipt.detail}); acked without running",
                task_id=record.task_id,
                task_name=record.task_name,
                worker=self.worker,
                reason=receipt.reason,
                **trace_context(record.headers),
            )
            return "duplicate"
        key = Key.of_record(record)
        with self._lock:
            self.local[key] = record
        limit = self.resurrector.max_resurrections(record.task_name) if taken else 0
        if taken and record.crashes > limit:
            # Its holder died with it once more than allowed: a poison pill, as the scanner
            # would find it (resurrect.py), caught here because the broker was faster.
            # The entry counts the earlier crashes, as the scanner's does.
            record.headers[CRASHES_HEADER] = earlier = record.crashes - 1
            why = f"worker {seen.rsplit('|', 2)[0]} was lost holding this task"
            self.quarantine_held(
                key,
                "max_resurrections",
                f"{why} after {earlier} earlier crash(es) with it: max_resurrections={limit}",
            )
            return "quarantined"
        return self._check_schema(key, record, message, args, kwargs, embed)

    def _take_over(self, message: Any, record: TaskRecord, seen: str) -> bool:
        """A broker's redelivery of a delivery whose holder is gone runs now, not after the
        holder's lease (presence.py); a live holder keeps it."""
        if not (message.delivery_info or {}).get("redelivered"):
            return False
        holder = seen.rsplit("|", 2)[0]
        if holder == self.worker or not self.presence.gone(holder):
            return False
        # The holder died holding it: a crash, counted against max_resurrections as the
        # scanner counts it, from the holder's copy (the broker's carries the count it was
        # published with, not the takeovers since).
        _, retries, resurrections = seen.rsplit("|", 2)
        field = f"{record.delivery_id}|{retries}|{resurrections}"
        raw = self.store.call(lambda c: c.hget(self.store.keys.held(holder), field))
        if raw is None:
            return False  # it completed, or a scanner took it: a duplicate after all
        try:
            crashes = TaskRecord.loads(raw, field).crashes + 1
        except (ValueError, KeyError, TypeError):
            return False  # unreadable: the scanner quarantines it raw, after the lease
        record.headers[CRASHES_HEADER] = crashes
        message.headers[CRASHES_HEADER] = crashes  # what the task's context shows
        gen = record.generation
        ttl = 10 * self.config.lease_ttl  # the holder's marker: past it, its lease ran out
        if not self.store.take_over(
            record.delivery_id, seen, self.worker, gen, record.dumps(), ttl
        ):
            return False
        events.emit(
            "task.taken_over",
            f"{record.task_name}[{record.task_id}] redelivered by the broker, and its holder "
            f"{holder} is gone (its presence connection closed): it runs now, not when that "
            "worker's lease runs out",
            task_id=record.task_id,
            task_name=record.task_name,
            worker=self.worker,
            holder=holder,
            **trace_context(record.headers),
        )
        return True

    def _check_schema(
        self,
        key: Key,
        record: TaskRecord,
        message: Any,
        args: list[Any],
        kwargs: dict[str, Any],
        embed: dict[str, Any],
    ) -> Verdict:
        """Migrate an older message before it runs; hold back a newer one."""
        version = envelope.message_version(record.headers)
        task = self.resurrector.app.tasks[record.task_name]
        local = envelope.schema_version(task)
        if version == local:
            return "run"
        if version > local:
            tries = as_int(record.headers.get(envelope.REQUEUES_HEADER))
            why = (
                f"{record.task_name}[{record.task_id}] has schema {version}; this worker knows "
                f"up to {local}"
            )
            if tries >= self.config.schema_max_requeues:
                self.quarantine_held(
                    key, "schema_too_new", f"{why}, after {tries} requeue(s) for a newer worker"
                )
                return "quarantined"
            events.emit(
                "task.schema_too_new",
                f"{why}: requeued for a newer worker in {self.config.schema_requeue_delay} s "
                f"(try {tries + 1} of {self.config.schema_max_requeues})",
                task_id=record.task_id,
                task_name=record.task_name,
                worker=self.worker,
                schema=version,
            )
            return "deferred"
        try:
            args, kwargs = envelope.migrate(record.task_name, version, local, args, kwargs)
            envelope.rewrite_body(message, args, kwargs, embed, local)
        except Exception:
            self.quarantine_held(
                key,
                "migration_failed",
                f"migrating {record.task_name} arguments from schema {version} to {local} "
                f"failed:\n{traceback.format_exc()}",
            )
            return "quarantined"
        envelope.emit_migrated(record, version, local)
        return "run"

    def requeue_for_newer(self, key: Key) -> bool:
        """Republish a held message from a newer schema, its requeue count raised by one."""
        with self._lock:
            record = self.local.pop(key, None)
        if record is None:
            return False
        tries = as_int(record.headers.get(envelope.REQUEUES_HEADER))
        self.resurrector.resurrect(
            record,
            self.worker,
            record.held_field(),
            "its schema is newer than this worker knows",
            crash=False,
            headers={envelope.REQUEUES_HEADER: tries + 1},
        )
        return True

    def _receive_other(self, message: Any) -> Verdict:
        """A message without protocol-2 task headers: a protocol 1 task runs (Celery converts
        it), unprotected; anything else goes to the DLQ."""
        record = envelope.raw_record_of(message, self.worker)
        body = message.body
        if isinstance(message.headers, dict | None) and envelope.protocol_one(
            body, message.content_type, message.content_encoding, self.accept
        ):
            events.emit(
                "task.unprotected",
                "a Celery protocol 1 message runs without a record and will NOT be "
                "resurrected if this worker dies: publish with task_protocol = 2",
                worker=self.worker,
            )
            return "run"
        return self._quarantine_unrecorded(
            record,
            envelope.BadMessage(
                "invalid_message",
                "not a Celery task message (no 'task' header, no protocol 1 body)",
            ),
        )

    def quarantine_message(self, message: Any, reason: str, error: str) -> bool:
        """Quarantine a message Celery could not take: from its record if relier holds it,
        raw otherwise. False if Redis could not be reached."""
        key = self.key_of(message)
        if self.holds(key):
            assert key is not None
            return self.quarantine_held(key, reason, error)
        record = envelope.raw_record_of(message, self.worker)
        return self._quarantine_unrecorded(record, envelope.BadMessage(reason, error)) != "parked"

    def _quarantine_unrecorded(self, record: TaskRecord, bad: envelope.BadMessage) -> Verdict:
        """Put a message relier never recorded into the DLQ; park it if Redis is down."""
        held = record.field_name is not None
        try:
            quarantine(
                self.store,
                record,
                bad.reason,
                str(bad),
                done_ttl=self.config.completed_ttl,
                held_by=self.worker if held else None,
                field=record.field_name,
            )
        except StoreUnavailable as exc:
            self._mark_store_down(exc)
            return "parked"
        return "quarantined"

    # -- final states -------------------------------------------------------------------
    @staticmethod
    def key_of(message: Any) -> Key | None:
        headers = getattr(message, "headers", None)
        if not isinstance(headers, dict) or "id" not in headers:
            return None
        return Key.of(headers, getattr(message, "delivery_info", None))

    def holds(self, key: Key | None) -> bool:
        return key is not None and key in self.local

    def to_pool(self, key: Key, request_dict: dict[str, Any], epoch: int) -> bool:
        """A request goes to the pool: False if this worker no longer holds it (given up when
        its lease was lost, or handed off), else stamp what the pool process checks."""
        with self._lock:
            record = self.local.get(key)
            if record is None:
                return False
            request_dict.pop(HELD_KEY, None)  # never one a message carried in
            request_dict[EPOCH_KEY] = epoch
            if record.field_name is not None:
                request_dict[HELD_KEY] = [self.worker, record.field_name]
        return True

    def give_up(self, clock: Any) -> list[TaskRecord]:
        """The lease was lost: raise the clock's epoch and forget every held delivery, in one
        step with :meth:`to_pool`, so none of them reaches a pool process as this lease's."""
        with self._lock:
            clock.lost()
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
            if in_pool and record.field_name is not None:
                self._done_in_pool.append(record.field_name)
                return
        self._complete(_Pending(key, True, record.field_name))

    def requeued(self, key: Key) -> None:
        """Celery gives the message back to the broker (Reject(requeue=True)): forget the
        delivery without marking it finished, so its next delivery runs. A fetched record is
        moved back to its queue by the transport's reject itself (fetch.py)."""
        with self._lock:
            record = self.local.pop(key, None)
        if record is None or record.field_name is None:
            self._complete(_Pending(key, False, None))

    def _complete(self, item: _Pending) -> None:
        """One round trip; on a Redis error the completion waits for the heartbeat's flush."""
        try:
            self._store_completion(item)
        except StoreUnavailable as exc:
            self._mark_store_down(exc)
            self._pending.append(item)

    def _store_completion(self, item: _Pending) -> None:
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
            fields, self._done_in_pool = self._done_in_pool, []
        if fields:
            try:
                self.store.ack_many(self.worker, fields)
            except Exception:
                with self._lock:
                    self._done_in_pool[:0] = fields
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

    def quarantine_held(self, key: Key, reason: str, error: str, **extra: Any) -> bool:
        """Move a held delivery that cannot run (or failed for good) to the DLQ."""
        with self._lock:
            record = self.local.pop(key, None)
        if record is None:
            return False
        quarantine(
            self.store,
            record,
            reason,
            error,
            done_ttl=self.config.completed_ttl,
            held_by=self.worker,
            field=record.held_field(),
            **extra,
        )
        return True

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

    # -- Redis health -------------------------------------------------------------------
    def _mark_store_down(self, exc: Exception) -> None:
        if not self._store_down:
            self._store_down = True
            events.emit(
                "store.unavailable",
                f"{exc}. Messages stay unacked with the broker until Redis is back",
                worker=self.worker,
            )

    def _mark_store_up(self) -> None:
        if self._store_down:
            self._store_down = False
            events.emit("store.recovered", "Redis is reachable again", worker=self.worker)
