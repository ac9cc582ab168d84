"""Phoenix resurrection: a dead worker's tasks run again on a live one.

A scanner lists workers whose lease ran out (expired.lua), claims their records atomically,
up to CLAIM_BATCH workers a call (so racing scanners never resurrect a task twice), and
republishes every message exactly as received with ``rl_resurrections`` raised by one; past
``max_resurrections`` the task goes to the dead letter queue instead. A record is removed only
after its republish succeeded: a scanner that dies midway leaves its claim to expire and the
rest to be taken again (at least once, never zero times).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from typing import Any

from relier_celery.core import events
from relier_celery.core.config import RelierConfig
from relier_celery.core.errors import ConfigError, RelierError
from relier_celery.core.record import TaskRecord, trace_context
from relier_celery.recovery.dlq import expire, quarantine
from relier_celery.recovery.envelope import raw_record
from relier_celery.recovery.orphans import UnackedSweep
from relier_celery.store.client import Store

__all__ = ["Resurrector"]

# Scanners look for DLQ entries past their retention once a minute, not on every scan.
DLQ_EXPIRY_INTERVAL = 60.0
# The task options this module reads (wiring/task_options.py checks every task's against all).
TASK_OPTIONS = ("max_resurrections",)


def validate_task(name: str, task: Any) -> None:
    """Raise :class:`ConfigError` for a bad ``max_resurrections`` of a task."""
    value = getattr(task, "max_resurrections", None)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ConfigError(
            f"task {name!r}: max_resurrections must be an integer >= 0, got {value!r}"
        )


logger = logging.getLogger("relier_celery")

# Dead workers claimed by one call: the claim must not run out while the scanner republishes
# what it took (a second scanner would take it again), so a mass death is taken a slice at once.
CLAIM_BATCH = 16


class _Batch:
    """One scan's publishing: a producer acquired at the first publish and released at the
    end, and the records published so far (worker -> fields), to drop in one call."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.taken: dict[str, list[str]] = {}
        self._stack = contextlib.ExitStack()
        self._producer: Any = None

    def producer(self) -> Any:
        if self._producer is None:
            pool = self.app.producer_pool
            self._producer = self._stack.enter_context(pool.acquire(block=True, timeout=10))
        return self._producer

    def __enter__(self) -> _Batch:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def _in_delivery_order(records: list[TaskRecord]) -> list[TaskRecord]:
    """The order to put a dead worker's tasks back in, so that the first delivered is the
    first taken again (what it was running before what it had prefetched): fetched ones are
    pushed onto the head of their queue, so the newest goes first; published ones join the
    tail, so the oldest goes first."""
    fetched = [r for r in records if r.queue_key is not None]
    published = [r for r in records if r.queue_key is None]
    fetched.sort(key=lambda r: r.received_at, reverse=True)
    published.sort(key=lambda r: r.received_at)
    return fetched + published


class Resurrector:
    """Scans for dead workers and resurrects their tasks."""

    def __init__(self, app: Any, config: RelierConfig, store: Store, name: str = "") -> None:
        self.app = app
        self.config = config
        self.store = store
        self.name = name or f"scanner-{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._timer_entry: Any = None
        self.unacked = UnackedSweep(app, config, store)
        self._next_expiry = 0.0

    def max_resurrections(self, task_name: str) -> int:
        task = self.app.tasks.get(task_name)
        value = getattr(task, "max_resurrections", None) if task is not None else None
        return self.config.max_resurrections if value is None else int(value)

    def resurrect(
        self,
        record: TaskRecord,
        held_by: str,
        field: str,
        why: str,
        crash: bool = True,
        headers: dict[str, Any] | None = None,
        batch: _Batch | None = None,
    ) -> str:
        """Republish one record (or quarantine it), then drop it; return what was done.

        ``crash`` says the worker died holding it; only crashes count against
        ``max_resurrections`` (a hand-off at shutdown or after a consumer restart does not).
        ``batch``: a scan's producer, and its list of records to drop once published."""
        limit = self.max_resurrections(record.task_name)
        crashes = record.crashes
        if crash and crashes >= limit:
            quarantine(
                self.store,
                record,
                "max_resurrections",
                f"worker {held_by} was lost holding this task ({why}) after {crashes} earlier "
                f"crash(es) with it: max_resurrections={limit}",
                done_ttl=self.config.completed_ttl,
                held_by=held_by,
                field=field,
            )
            return "quarantined"
        nxt = record.next_generation(crash, headers)
        if record.queue_key is not None:
            # Fetched: back to the head of the list it came from, in one step with dropping
            # the record (it was delivered before everything queued behind it).
            if not self.store.requeue(held_by, field, record.queue_key, nxt.envelope(), True):
                return "gone"  # it completed, or another scanner moved it, meanwhile
        elif batch is not None:
            nxt.publish(batch.producer())
            batch.taken.setdefault(held_by, []).append(field)
        else:
            with self.app.producer_pool.acquire(block=True, timeout=10) as producer:
                nxt.publish(producer)
            self.store.take({held_by: [field]})
        events.emit(
            events.TASK_RESURRECTED if crash else events.TASK_HANDED_OFF,
            f"{record.task_name}[{record.task_id}] republished: {why}",
            task_id=record.task_id,
            task_name=record.task_name,
            worker=held_by,
            resurrections=nxt.generation.resurrections,
            crashes=nxt.crashes,
            reason=why,
            **trace_context(record.headers),
        )
        return "resurrected" if crash else "handed_off"

    def quarantine_unreadable(self, dead: str, field: str, raw: str, exc: Exception) -> None:
        """A held record that cannot be parsed goes to the DLQ raw, never back in a loop."""
        quarantine(
            self.store,
            raw_record(dead, None, raw, "application/x-relier-record", "utf-8"),
            "invalid_envelope",
            f"the record {field!r} held by worker {dead} cannot be read ({exc!r}); the "
            "body of this entry is the record as it was in Redis",
            done_ttl=self.config.completed_ttl,
            held_by=dead,
            field=field,
        )

    def scan_once(self) -> int:
        """One scan over every expired lease; return how many tasks were resurrected or
        quarantined."""
        handled = 0
        expired = self.store.expired_leases()
        dead = list(expired)
        for at in range(0, len(dead), CLAIM_BATCH):
            handled += self._resurrect_workers(dead[at : at + CLAIM_BATCH], expired)
        handled += self.unacked.sweep()
        self.store.mark_scan()
        if time.monotonic() >= self._next_expiry:
            self._next_expiry = time.monotonic() + DLQ_EXPIRY_INTERVAL
            expire(self.store, self.config.dlq_retention)
        return handled

    def _resurrect_workers(self, dead: list[str], deadlines: dict[str, float]) -> int:
        """Claim a batch of dead workers and put back every record they held: a constant
        number of round trips to relier's Redis whatever the batch's size, plus one publish
        (or head-of-queue push) per record."""
        claimed = self.store.claim(dead, self.name, self.config.claim_ttl)
        if not claimed:
            return 0
        handled = 0
        recovered: list[tuple[float, int]] = []
        with _Batch(self.app) as batch:
            try:
                for worker, held in claimed.items():
                    records, republished = self._resurrect_held(worker, held, batch)
                    handled += records
                    # The last heartbeat was a lease before the deadline (_record_recovery).
                    last_alive = deadlines[worker] - self.config.lease_ttl * 1000
                    recovered.append((last_alive, republished))
            finally:
                # What was published is dropped even when a later publish failed; what was
                # not stays held, for the next scan once the claim is ended.
                try:
                    self.store.take(batch.taken)
                finally:
                    self.store.claim_finish(list(claimed), self.name)
        self._record_recovery(recovered)
        return handled

    def _resurrect_held(self, dead: str, held: dict[str, str], batch: _Batch) -> tuple[int, int]:
        """Put back one dead worker's claimed records; return (records handled, republished)."""
        events.emit(
            events.SCAN_CLAIMED,
            f"worker {dead} is dead; taking {len(held)} task(s)",
            worker=dead,
            count=len(held),
            scanner=self.name,
        )
        records: list[TaskRecord] = []
        for field, raw in held.items():
            try:
                records.append(TaskRecord.loads(raw, field))
            except (ValueError, KeyError, TypeError) as exc:
                self.quarantine_unreadable(dead, field, raw, exc)
        republished = 0
        why = "its worker's lease expired"
        for record in _in_delivery_order(records):
            if self.resurrect(record, dead, record.held_field(), why, batch=batch) == "resurrected":
                republished += 1
        return len(records), republished

    def _record_recovery(self, samples: list[tuple[float, int]]) -> None:
        """One sample per republished task, from the dead worker's last heartbeat (its lease
        deadline less the lease) to now: an upper bound of kill -> republished, for the live
        view's recovery p50/p95. Informative only: a failure here costs nothing else."""
        try:
            self.store.add_recovery(samples)
        except Exception as exc:
            logger.warning("relier: could not record recovery times: %r", exc)

    # -- every scan_interval --------------------------------------------------------------
    def start(self, timer: Any = None) -> None:
        """Scan every ``scan_interval``: on ``timer`` (a prefork worker's event loop, kombu's
        hub: no thread of relier's there, see docs/rabbitmq-recovery.md), else in a thread."""
        if timer is not None:
            self._timer_entry = timer.call_repeatedly(self.config.scan_interval, self._scan)
            return
        self._thread = threading.Thread(target=self._loop, name="relier-scanner", daemon=True)
        self._thread.start()

    def rearm(self, timer: Any) -> None:
        """Register the scan on ``timer`` again, if it runs there (Celery 5.6 clears every
        hub timer when the consumer restarts; 5.7 keeps them)."""
        if self._timer_entry is not None:
            self._timer_entry.cancel()
            self._timer_entry = timer.call_repeatedly(self.config.scan_interval, self._scan)

    def stop(self) -> None:
        self._stop.set()
        if self._timer_entry is not None:
            self._timer_entry.cancel()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.unacked.close()

    def run_forever(self) -> None:
        """Scan until stopped (the standalone resurrector)."""
        self._loop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._scan()
            self._stop.wait(self.config.scan_interval)

    def _scan(self) -> None:
        try:
            self.scan_once()
        except RelierError as exc:
            events.emit(events.STORE_UNAVAILABLE, f"resurrection scan failed: {exc}")
        except Exception:
            logger.exception("relier: resurrection scan failed; retrying")
