"""Dead letter queue entries: a task relier will not run again until an operator releases it.

An entry keeps the exact message (so a release can republish it), the reason, the error text
or traceback, the worker involved and the counts. Entries have no TTL: retention and the
operator tooling (list, show, release, purge) are built on this format.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from . import events
from .record import TaskRecord, trace_context
from .store import Store

__all__ = ["quarantine"]


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
        record.task_id,
        gen,
        done_ttl,
        worker=held_by,
        field=field,
    )
    events.emit(
        "task.quarantined",
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
