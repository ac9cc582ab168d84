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

__all__ = ["Event", "counters", "emit", "subscribe", "unsubscribe"]

logger = logging.getLogger("relier_celery")

Subscriber = Callable[["Event"], None]

# Event names and the log level each is logged at. Events that mean "a guarantee was needed"
# are warnings, so they stand out in a worker's log.
LEVELS: dict[str, int] = {
    "worker.started": logging.INFO,
    "worker.stopped": logging.INFO,
    "lease.lost": logging.ERROR,
    "lease.given_up": logging.WARNING,
    "lease.waited": logging.WARNING,
    "task.fenced": logging.WARNING,
    "task.resurrected": logging.WARNING,
    "task.handed_off": logging.INFO,
    "drain.started": logging.WARNING,
    "drain.hurried": logging.WARNING,
    "drain.finished": logging.WARNING,
    "task.quarantined": logging.ERROR,
    "task.duplicate_dropped": logging.WARNING,
    "task.taken_over": logging.WARNING,
    "task.unprotected": logging.ERROR,
    "task.timeout": logging.WARNING,
    "task.timeout_hook_failed": logging.ERROR,
    "task.orphan_restored": logging.WARNING,
    "store.unavailable": logging.ERROR,
    "store.recovered": logging.WARNING,
    "scan.claimed": logging.WARNING,
    "config.warning": logging.WARNING,
    "task.schema_too_new": logging.WARNING,
    "task.migrated": logging.INFO,
    "dlq.released": logging.WARNING,
    "dlq.purged": logging.WARNING,
    "dlq.expired": logging.WARNING,
    "idempotency.interrupted": logging.ERROR,
    "idempotency.unavailable": logging.ERROR,
    "idempotency.store_failed": logging.ERROR,
    "admission.rejected": logging.WARNING,
    "admission.fail_open": logging.WARNING,
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
