"""Fleet-wide counters of the rare events, kept in Redis so ``relier inspect`` can show them.

Only events that mean a guarantee was needed are counted (resurrections, quarantines,
duplicates dropped, idempotent hits, timeouts, admission rejects, drains, ...), never a task's
ordinary success: counting adds no Redis round trip to the per-task happy path. Increments are
batched in memory and written at most once per ``FLUSH_INTERVAL`` (one pipelined round trip,
and none while nothing happens), by a flusher thread, or by the event loop of a prefork
worker's main process. A process SIGKILLed inside that window
loses its last increments: the counters are for operators, not for accounting.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections import Counter
from typing import Any

from relier_celery.core import events
from relier_celery.core.events import Event
from relier_celery.store.client import Store

__all__ = ["COUNTED", "Counters"]

logger = logging.getLogger("relier_celery")

# Event name -> counter name (the Redis hash field and, as ``rl.<name>``, the OTel metric).
COUNTED: dict[str, str] = {
    events.TASK_RESURRECTED: "resurrections",
    events.TASK_HANDED_OFF: "hand_offs",
    events.TASK_QUARANTINED: "quarantines",
    events.TASK_DUPLICATE_DROPPED: "duplicates_dropped",
    events.TASK_TAKEN_OVER: "taken_over",
    events.TASK_ORPHAN_RESTORED: "orphans_restored",
    events.IDEMPOTENCY_HIT: "idempotent_hits",
    events.TASK_TIMEOUT: "timeouts",
    events.ADMISSION_REJECTED: "admission_rejects",
    events.DRAIN_FINISHED: "drains",
    events.LEASE_LOST: "leases_lost",
    events.TASK_FENCED: "fenced",
}
# Seconds between two flushes; about one heartbeat.
FLUSH_INTERVAL = 1.0


class Counters:
    """An event subscriber adding up counted events, flushed to Redis in batches."""

    def __init__(self, store: Store, interval: float = FLUSH_INTERVAL) -> None:
        self.store = store
        self.interval = interval
        self._pending: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._timer_entry: Any = None
        atexit.register(self.flush_quietly)
        # Billiard forks pool processes at any time (a replaced child): a child must not
        # inherit a lock the flusher thread held at that instant, nor the parent's counts.
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._pending = Counter()
        self._thread = None
        self._timer_entry = None  # the parent's event loop: a pool process has a thread

    def __call__(self, event: Event) -> None:
        name = COUNTED.get(event.name)
        if name is None:
            return
        with self._lock:
            self._pending[name] += 1
            if self._thread is None and self._timer_entry is None:
                self._start()

    def start(self, timer: Any) -> None:
        """Flush every ``interval`` on ``timer`` (a prefork worker's event loop, kombu's hub:
        no thread of relier's there, see docs/rabbitmq-recovery.md) from now on, instead of in a
        thread started by the first counted event."""
        with self._lock:
            if self._thread is None and self._timer_entry is None:
                self._timer_entry = timer.call_repeatedly(self.interval, self.flush_quietly)

    def rearm(self, timer: Any) -> None:
        """Register the flush on ``timer`` again, if it runs there (Celery 5.6 clears every
        hub timer when the consumer restarts; 5.7 keeps them)."""
        with self._lock:
            if self._timer_entry is not None:
                self._timer_entry.cancel()
                self._timer_entry = timer.call_repeatedly(self.interval, self.flush_quietly)

    def _start(self) -> None:
        if not self._stop.is_set():
            self._thread = threading.Thread(target=self._loop, name="relier-counters", daemon=True)
            self._thread.start()

    def flush(self) -> None:
        """Write the pending increments now (raises StoreUnavailable; they are kept then)."""
        with self._lock:
            batch = dict(self._pending)
            self._pending.clear()
        try:
            self.store.add_counters(batch)
        except Exception:
            with self._lock:
                self._pending.update(batch)
            raise

    def flush_quietly(self) -> None:
        try:
            self.flush()
        except Exception as exc:  # counters are informative: never break the flusher
            logger.warning("relier: could not write event counters: %r", exc)

    def close(self) -> None:
        """Stop the flusher and write what is pending."""
        self._stop.set()
        if self._timer_entry is not None:
            self._timer_entry.cancel()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        self.flush_quietly()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush_quietly()
