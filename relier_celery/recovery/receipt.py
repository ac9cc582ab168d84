"""Receipt, in the worker's main process: every task message is recorded in Redis under this
worker's lease before Celery sees it (so before it can be acked). A delivery already held or
finished is a duplicate: it is acked and dropped, never run twice (G4). If Redis cannot be
reached, the message is parked unacked and retried: it stays with the broker, nothing is lost.
A message from a newer schema is requeued for a newer worker, one that cannot run is
quarantined.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass
from typing import Any

from relier_celery.core import events
from relier_celery.core.errors import StoreUnavailable
from relier_celery.core.headers import (
    CRASHES_HEADER,
    FETCH_EPOCH,
    FETCH_FIELD,
    FETCH_QUEUE,
    REQUEUES_HEADER,
)
from relier_celery.core.record import TaskRecord, as_int, trace_context
from relier_celery.recovery import envelope, schema
from relier_celery.recovery.registry import Key, Registry, Verdict
from relier_celery.recovery.takeover import answer, plain, record_call
from relier_celery.store.client import Receipt

__all__ = ["Receiving"]

# How long a parked message's retry may find this worker's own record of it and run it.
UNSURE_FOR = 600.0

logger = logging.getLogger("relier_celery")


class Receiving(Registry):
    """The receipt side of the registry."""

    # -- receipt ------------------------------------------------------------------------
    def receive(self, message: Any, known_tasks: Any) -> Verdict:
        """Decide what happens to one incoming message."""
        verdict = self.receive_many([message], known_tasks)[0]
        if isinstance(verdict, Exception):
            raise verdict
        return verdict

    def receive_many(self, messages: list[Any], known_tasks: Any) -> list[Verdict | Exception]:
        """Decide what happens to messages the broker delivered together, in their order;
        an error relier's checks raised for one of them in its place. Their receipts go to
        Redis in one round trip: a dead worker's burst of redeliveries costs about one, not
        one each (docs/rabbitmq-recovery.md)."""
        steps: list[Verdict | Exception | _Receiving] = []
        for message in messages:
            try:
                steps.append(self._prepare(message, known_tasks))
            except Exception as exc:
                steps.append(exc)
        pending = [s for s in steps if isinstance(s, _Receiving)]
        for waiting, receipt in zip(pending, self._receipts(pending), strict=True):
            waiting.receipt = receipt
        verdicts: list[Verdict | Exception] = []
        for step in steps:
            try:
                verdicts.append(self._finish(step) if isinstance(step, _Receiving) else step)
            except Exception as exc:
                verdicts.append(exc)
        return verdicts

    def _prepare(self, message: Any, known_tasks: Any) -> Verdict | _Receiving:
        """Everything before the receipt: a verdict for a message that needs none."""
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
            with self._lock:  # one step with give_up: it raises the epoch under this lock
                stale = self._fetched_under_a_lost_lease(info)
                if not stale:
                    self.local[key] = record
            if stale:
                events.emit(
                    events.TASK_FENCED,
                    f"{record.task_name}[{record.task_id}] was fetched under a lease this worker "
                    "has lost since (the fetch's reply was read after the loss): not run here, "
                    "given back to its queue unless a scanner took it already",
                    task_id=record.task_id,
                    task_name=record.task_name,
                    worker=self.worker,
                )
                return "given_back"
            return self._check_schema(key, record, message, args, kwargs, embed)
        if len(record.body) > self.config.max_message_bytes:
            events.emit(
                events.TASK_UNPROTECTED,
                f"{record.task_name}[{record.task_id}] body is {len(record.body)} bytes, "
                f"above relier_max_message_bytes={self.config.max_message_bytes}: it runs "
                "without a record and will NOT be resurrected if this worker dies",
                task_id=record.task_id,
                task_name=record.task_name,
                worker=self.worker,
            )
            return "run"
        return _Receiving(message, record, args, kwargs, embed)

    def _fetched_under_a_lost_lease(self, info: dict[str, Any]) -> bool:
        """A fetch sent under an epoch the lease has left since: Redis took the message while
        the lease was live, but the worker froze before reading the reply, and since then a
        scanner may have resurrected it (fetch.py stamps the epoch at the send)."""
        sent = info.get(FETCH_EPOCH)
        return self.clock is not None and sent is not None and int(sent) != self.clock.epoch

    def _receipts(self, steps: list[_Receiving]) -> list[Receipt | Exception]:
        """Each message's receipt (a broker's redelivery may be a takeover), their calls to
        Redis together (takeover.answer)."""
        asks = [
            self.takeover.ask(s.message, s.record)
            if s.redelivered
            else plain(record_call(self.store, s.record, self.worker))
            for s in steps
        ]
        return answer(self.store, asks)

    def _finish(self, step: _Receiving) -> Verdict:
        """Everything after the receipt."""
        record, receipt = step.record, step.receipt
        key = Key.of_record(record)
        if isinstance(receipt, StoreUnavailable):
            self._unsure(key)  # the script may have run, its reply lost
            self._mark_store_down(receipt)
            return "parked"
        if not isinstance(receipt, Receipt):
            raise receipt or RuntimeError("no receipt")
        self._mark_store_up()
        unsure = self._unsure_until.pop(key, 0.0) > time.monotonic()  # a definite answer now
        if not receipt.recorded and receipt.own and unsure and key not in self.local:
            # This worker's own receipt of it landed before: run it (not "a duplicate" that
            # would wait, acked, for this worker's hand-off or death). Only the retry of a
            # receipt that failed here: a record handed off or given up is no longer in the
            # held hash, and one this worker received since is in its local map.
            events.emit(
                events.STORE_RECOVERED,
                f"{record.task_name}[{record.task_id}] was recorded by this worker before "
                "Redis stopped answering: it runs now",
                task_id=record.task_id,
                worker=self.worker,
            )
            receipt = Receipt(True, "recorded before")
        if not receipt.recorded:
            events.emit(
                events.TASK_DUPLICATE_DROPPED,
                f"{record.task_name}[{record.task_id}] delivery {record.generation.retries}|"
                f"{record.generation.resurrections} is not newer than the one {receipt.reason} "
                f"({receipt.detail}); acked without running",
                task_id=record.task_id,
                task_name=record.task_name,
                worker=self.worker,
                reason=receipt.reason,
                **trace_context(record.headers),
            )
            return "duplicate"
        with self._lock:
            self.local[key] = record
        taken = receipt.reason == "taken"
        limit = self.resurrector.max_resurrections(record.task_name) if taken else 0
        if taken and record.crashes > limit:
            # Its holder died with it once more than allowed: a poison pill, as the scanner
            # would find it (resurrect.py), caught here because the broker was faster.
            # The entry counts the earlier crashes, as the scanner's does.
            record.headers[CRASHES_HEADER] = earlier = record.crashes - 1
            self.quarantine_held(
                key,
                "max_resurrections",
                f"worker {receipt.detail} was lost holding this task after {earlier} earlier "
                f"crash(es) with it: max_resurrections={limit}",
            )
            return "quarantined"
        return self._check_schema(key, record, step.message, step.args, step.kwargs, step.embed)

    def _unsure(self, key: Key) -> None:
        """Remember, for UNSURE_FOR, that ``key``'s receipt failed: it may have been written."""
        now = time.monotonic()
        self._unsure_until = {k: t for k, t in self._unsure_until.items() if t > now}
        self._unsure_until[key] = now + UNSURE_FOR

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
        local = schema.schema_version(task)
        if version == local:
            return "run"
        if version > local:
            tries = as_int(record.headers.get(REQUEUES_HEADER))
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
                events.TASK_SCHEMA_TOO_NEW,
                f"{why}: requeued for a newer worker in {self.config.schema_requeue_delay} s "
                f"(try {tries + 1} of {self.config.schema_max_requeues})",
                task_id=record.task_id,
                task_name=record.task_name,
                worker=self.worker,
                schema=version,
            )
            return "deferred"
        try:
            args, kwargs = schema.migrate(record.task_name, version, local, args, kwargs)
            schema.rewrite_body(message, args, kwargs, embed, local)
        except Exception:
            self.quarantine_held(
                key,
                "migration_failed",
                f"migrating {record.task_name} arguments from schema {version} to {local} "
                f"failed:\n{traceback.format_exc()}",
            )
            return "quarantined"
        schema.emit_migrated(record, version, local)
        return "run"

    def requeue_for_newer(self, key: Key) -> bool:
        """Republish a held message from a newer schema, its requeue count raised by one."""
        with self._lock:
            record = self.local.pop(key, None)
        if record is None:
            return False
        tries = as_int(record.headers.get(REQUEUES_HEADER))
        self.resurrector.resurrect(
            record,
            self.worker,
            record.held_field(),
            "its schema is newer than this worker knows",
            crash=False,
            headers={REQUEUES_HEADER: tries + 1},
        )
        return True


@dataclass
class _Receiving:
    """A task message between its checks and its receipt."""

    message: Any
    record: TaskRecord
    args: list[Any]
    kwargs: dict[str, Any]
    embed: dict[str, Any]
    receipt: Receipt | Exception | None = None

    @property
    def redelivered(self) -> bool:
        return bool((self.message.delivery_info or {}).get("redelivered"))
