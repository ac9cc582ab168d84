"""One small event hub: every primitive reports what it does here, and never logs or traces
directly. Logging subscribes by default; OpenTelemetry and the CLI's counters subscribe too.

A subscriber that raises is logged and skipped: a broken exporter never breaks a task.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ADMISSION_FAIL_OPEN",
    "ADMISSION_REJECTED",
    "CONFIG_WARNING",
    "DLQ_EXPIRED",
    "DLQ_PURGED",
    "DLQ_RELEASED",
    "DRAIN_FINISHED",
    "DRAIN_HURRIED",
    "DRAIN_STARTED",
    "FETCH_PAUSED",
    "FETCH_RESUMED",
    "IDEMPOTENCY_CLAIMED",
    "IDEMPOTENCY_CONFLICT",
    "IDEMPOTENCY_FENCED",
    "IDEMPOTENCY_HIT",
    "IDEMPOTENCY_INTERRUPTED",
    "IDEMPOTENCY_STORE_FAILED",
    "IDEMPOTENCY_TAKEOVER",
    "IDEMPOTENCY_UNAVAILABLE",
    "LEASE_GIVEN_UP",
    "LEASE_LOST",
    "LEASE_WAITED",
    "LEVELS",
    "SCAN_CLAIMED",
    "STORE_RECOVERED",
    "STORE_UNAVAILABLE",
    "TASK_DUPLICATE_DROPPED",
    "TASK_FENCED",
    "TASK_HANDED_OFF",
    "TASK_MIGRATED",
    "TASK_ORPHAN_RESTORED",
    "TASK_QUARANTINED",
    "TASK_RESURRECTED",
    "TASK_SCHEMA_TOO_NEW",
    "TASK_TAKEN_OVER",
    "TASK_TIMEOUT",
    "TASK_TIMEOUT_HOOK_FAILED",
    "TASK_UNPROTECTED",
    "WORKER_STARTED",
    "WORKER_STOPPED",
    "Event",
    "counters",
    "emit",
    "subscribe",
    "unsubscribe",
]

logger = logging.getLogger("relier_celery")

Subscriber = Callable[["Event"], None]

# Every event relier emits, by name. Its log level is in LEVELS: events that mean "a guarantee
# was needed" are warnings, so they stand out in a worker's log.
ADMISSION_FAIL_OPEN = "admission.fail_open"
ADMISSION_REJECTED = "admission.rejected"
CONFIG_WARNING = "config.warning"
DLQ_EXPIRED = "dlq.expired"
DLQ_PURGED = "dlq.purged"
DLQ_RELEASED = "dlq.released"
DRAIN_FINISHED = "drain.finished"
DRAIN_HURRIED = "drain.hurried"
DRAIN_STARTED = "drain.started"
FETCH_PAUSED = "fetch.paused"
FETCH_RESUMED = "fetch.resumed"
IDEMPOTENCY_CLAIMED = "idempotency.claimed"
IDEMPOTENCY_CONFLICT = "idempotency.conflict"
IDEMPOTENCY_FENCED = "idempotency.fenced"
IDEMPOTENCY_HIT = "idempotency.hit"
IDEMPOTENCY_INTERRUPTED = "idempotency.interrupted"
IDEMPOTENCY_STORE_FAILED = "idempotency.store_failed"
IDEMPOTENCY_TAKEOVER = "idempotency.takeover"
IDEMPOTENCY_UNAVAILABLE = "idempotency.unavailable"
LEASE_GIVEN_UP = "lease.given_up"
LEASE_LOST = "lease.lost"
LEASE_WAITED = "lease.waited"
SCAN_CLAIMED = "scan.claimed"
STORE_RECOVERED = "store.recovered"
STORE_UNAVAILABLE = "store.unavailable"
TASK_DUPLICATE_DROPPED = "task.duplicate_dropped"
TASK_FENCED = "task.fenced"
TASK_HANDED_OFF = "task.handed_off"
TASK_MIGRATED = "task.migrated"
TASK_ORPHAN_RESTORED = "task.orphan_restored"
TASK_QUARANTINED = "task.quarantined"
TASK_RESURRECTED = "task.resurrected"
TASK_SCHEMA_TOO_NEW = "task.schema_too_new"
TASK_TAKEN_OVER = "task.taken_over"
TASK_TIMEOUT = "task.timeout"
TASK_TIMEOUT_HOOK_FAILED = "task.timeout_hook_failed"
TASK_UNPROTECTED = "task.unprotected"
WORKER_STARTED = "worker.started"
WORKER_STOPPED = "worker.stopped"

LEVELS: dict[str, int] = {
    ADMISSION_FAIL_OPEN: logging.WARNING,
    ADMISSION_REJECTED: logging.WARNING,
    CONFIG_WARNING: logging.WARNING,
    DLQ_EXPIRED: logging.WARNING,
    DLQ_PURGED: logging.WARNING,
    DLQ_RELEASED: logging.WARNING,
    DRAIN_FINISHED: logging.WARNING,
    DRAIN_HURRIED: logging.WARNING,
    DRAIN_STARTED: logging.WARNING,
    FETCH_PAUSED: logging.INFO,
    FETCH_RESUMED: logging.INFO,
    IDEMPOTENCY_CLAIMED: logging.INFO,
    IDEMPOTENCY_CONFLICT: logging.INFO,
    IDEMPOTENCY_FENCED: logging.INFO,
    IDEMPOTENCY_HIT: logging.INFO,
    IDEMPOTENCY_INTERRUPTED: logging.ERROR,
    IDEMPOTENCY_STORE_FAILED: logging.ERROR,
    IDEMPOTENCY_TAKEOVER: logging.INFO,
    IDEMPOTENCY_UNAVAILABLE: logging.ERROR,
    LEASE_GIVEN_UP: logging.WARNING,
    LEASE_LOST: logging.ERROR,
    LEASE_WAITED: logging.WARNING,
    SCAN_CLAIMED: logging.WARNING,
    STORE_RECOVERED: logging.WARNING,
    STORE_UNAVAILABLE: logging.ERROR,
    TASK_DUPLICATE_DROPPED: logging.WARNING,
    TASK_FENCED: logging.WARNING,
    TASK_HANDED_OFF: logging.INFO,
    TASK_MIGRATED: logging.INFO,
    TASK_ORPHAN_RESTORED: logging.WARNING,
    TASK_QUARANTINED: logging.ERROR,
    TASK_RESURRECTED: logging.WARNING,
    TASK_SCHEMA_TOO_NEW: logging.WARNING,
    TASK_TAKEN_OVER: logging.WARNING,
    TASK_TIMEOUT: logging.WARNING,
    TASK_TIMEOUT_HOOK_FAILED: logging.ERROR,
    TASK_UNPROTECTED: logging.ERROR,
    WORKER_STARTED: logging.INFO,
    WORKER_STOPPED: logging.INFO,
}


@dataclass(frozen=True)
class Event:
    """Something relier did. An attribute ``task_id`` is exported as ``rl.task.id``."""

    name: str
    message: str
    attributes: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.time)


_subscribers: list[Subscriber] = []
_lock = threading.Lock()
counters: Counter[str] = Counter()
"""How many of each event this process emitted."""


def subscribe(fn: Subscriber) -> None:
    with _lock:
        if fn not in _subscribers:
            _subscribers.append(fn)


def unsubscribe(fn: Subscriber) -> None:
    with _lock:
        if fn in _subscribers:
            _subscribers.remove(fn)


def emit(name: str, message: str, **attributes: Any) -> Event:
    """Report an event to every subscriber."""
    event = Event(name, message, attributes)
    counters[name] += 1
    for fn in list(_subscribers):
        try:
            fn(event)
        except Exception:  # a broken subscriber must never break the caller
            logger.exception("relier event subscriber %r failed on %s", fn, name)
    return event


def log_event(event: Event) -> None:
    """The default subscriber: one log line per event."""
    level = LEVELS.get(event.name, logging.INFO)
    if logger.isEnabledFor(level):
        attrs = " ".join(f"{k}={v}" for k, v in event.attributes.items())
        logger.log(level, "relier %s: %s %s", event.name, event.message, attrs)


subscribe(log_event)
