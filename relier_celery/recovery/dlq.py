"""Dead letter queue: a task relier will not run again until an operator releases it.

An entry keeps the exact message (body bytes, headers, properties, exchange, routing key) so a
release can republish it, the reason, the error text or traceback, the worker involved and the
counts. Entries have no Redis TTL, so Redis never evicts one on its own: the scanners expire
entries older than ``relier_dlq_retention`` (two weeks by default), loudly, and operators
release or purge them with ``celery -A app relier dlq``.

Reasons: ``max_resurrections`` (a poison pill), ``exception`` / ``hard_timeout`` /
``rejected`` (failed for good, ``relier_dlq_on_failure``), ``unknown_task``, ``undecodable``,
``invalid_message``, ``schema_too_new``, ``migration_failed``, ``idempotency_interrupted``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from relier_celery.core import events
from relier_celery.core.errors import ConfigError
from relier_celery.core.headers import (
    CRASHES_HEADER,
    REQUEUES_HEADER,
    RERUN_HEADER,
    RESURRECTIONS_HEADER,
)
from relier_celery.core.record import TaskRecord, trace_context
from relier_celery.store.client import Store

__all__ = ["Entry", "entries", "expire", "find", "purge", "quarantine", "release"]

# Headers a release resets: the released run starts its counts again.
# The task options this module reads (wiring/task_options.py checks every task's against all).
TASK_OPTIONS = ("dlq_on_failure",)


def validate_task(name: str, task: Any) -> None:
    """Raise :class:`ConfigError` for a bad ``dlq_on_failure`` of a task."""
    dlq = getattr(task, "dlq_on_failure", None)
    if dlq is not None and not isinstance(dlq, bool):
        raise ConfigError(f"task {name!r}: dlq_on_failure must be True or False, got {dlq!r}")


_RESET = {"retries": 0, RESURRECTIONS_HEADER: 0, CRASHES_HEADER: 0, REQUEUES_HEADER: 0}

Entry = dict[str, Any]


def quarantine(
    store: Store,
    record: TaskRecord,
    reason: str,
    error: str,
    *,
    done_ttl: float,
    held_by: str | None = None,
    field: str | None = None,
    **extra: Any,
) -> str:
    """Write a DLQ entry for ``record`` (and drop its in-flight record); return the entry id."""
    entry_id = uuid.uuid4().hex
    now = time.time()
    gen = record.generation
    entry = {
        "id": entry_id,
        "task_id": record.task_id,
        "task_name": record.task_name,
        "delivery_id": record.delivery_id,
        "reason": reason,
        "error": error,
        "worker": held_by or record.worker,
        "quarantined_at": now,
        "retries": gen.retries,
        "resurrections": gen.resurrections,
        "crashes": record.crashes,
        "message": json.loads(record.dumps()),
        **extra,
    }
    store.dlq_put(
        entry_id,
        json.dumps(entry, default=str),
        int(now * 1000),
        record.delivery_id,
        gen,
        done_ttl,
        worker=held_by,
        field=field,
    )
    events.emit(
        events.TASK_QUARANTINED,
        f"{record.task_name}[{record.task_id}] moved to the DLQ",
        task_id=record.task_id,
        task_name=record.task_name,
        dlq_reason=reason,
        dlq_id=entry_id,
        worker=held_by or record.worker,
        resurrections=gen.resurrections,
        **trace_context(record.headers),
    )
    return entry_id


def entries(store: Store, task: str | None = None, reason: str | None = None) -> list[Entry]:
    """Every entry (oldest first), optionally only one task name or reason."""
    out = []
    for raw in store.dlq_entries().values():
        entry = json.loads(raw)
        if (task is None or entry.get("task_name") == task) and (
            reason is None or entry.get("reason") == reason
        ):
            out.append(entry)
    return sorted(out, key=lambda e: (e.get("quarantined_at", 0), e["id"]))


def find(store: Store, entry_id: str) -> Entry:
    """The entry with this id, or the one whose id starts with it; KeyError otherwise."""
    raw = store.dlq_get(entry_id)
    if raw is not None:
        return dict(json.loads(raw))
    matches = [e for e in entries(store) if e["id"].startswith(entry_id)] if entry_id else []
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise KeyError(f"no DLQ entry {entry_id!r}")
    raise KeyError(f"{len(matches)} DLQ entries start with {entry_id!r}: give more of the id")


def released_record(entry: Entry) -> TaskRecord:
    """The entry's message as it will be republished: counts reset, and the operator's
    approval to rerun an interrupted idempotent run."""
    record = TaskRecord.loads(json.dumps(entry["message"]))
    headers = {**record.headers, **_RESET, RERUN_HEADER: 1}
    return TaskRecord(**{**record.__dict__, "headers": headers})


def release(app: Any, store: Store, entry: Entry) -> TaskRecord:
    """Republish an entry's original message and remove the entry (at least once: the entry
    goes only after the publish succeeded)."""
    record = released_record(entry)
    store.forget_done(record.delivery_id)  # the same publication: the headers are kept
    with app.producer_pool.acquire(block=True, timeout=10) as producer:
        record.publish(producer)
    store.dlq_remove([entry["id"]])
    events.emit(
        events.DLQ_RELEASED,
        f"{record.task_name}[{record.task_id}] released from the DLQ ({entry['reason']})",
        task_id=record.task_id,
        task_name=record.task_name,
        dlq_id=entry["id"],
        dlq_reason=entry["reason"],
    )
    return record


def purge(store: Store, chosen: list[Entry]) -> int:
    """Delete entries for good; return how many were removed."""
    removed = store.dlq_remove([e["id"] for e in chosen])
    if removed:
        events.emit(
            events.DLQ_PURGED,
            f"{removed} DLQ entr{'y' if removed == 1 else 'ies'} purged",
            count=removed,
            dlq_ids=",".join(e["id"] for e in chosen[:20]),
        )
    return removed


def expire(store: Store, retention: float) -> int:
    """Remove entries older than ``retention`` seconds (by Redis's clock), with an event."""
    ids = store.dlq_older_than(store.now_ms() - int(retention * 1000))
    removed = store.dlq_remove(ids)
    if removed:
        events.emit(
            events.DLQ_EXPIRED,
            f"{removed} DLQ entr{'y' if removed == 1 else 'ies'} older than "
            f"relier_dlq_retention ({retention:.0f} s) removed",
            count=removed,
        )
    return removed
