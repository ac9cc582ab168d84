"""The state of one worker's in-flight registry, shared by its receipt side (receipt.py) and
its final states (inflight.py): the deliveries it holds in memory, the completions waiting for
Redis, and whether Redis is reachable. A delivery is named by its :class:`Key`.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from relier_celery.core import events
from relier_celery.core.config import RelierConfig
from relier_celery.core.errors import StoreUnavailable
from relier_celery.core.headers import (
    FETCH_FIELD,
)
from relier_celery.core.record import Generation, TaskRecord, delivery_id
from relier_celery.recovery import envelope
from relier_celery.recovery.dlq import quarantine
from relier_celery.recovery.resurrect import Resurrector
from relier_celery.recovery.takeover import Takeover
from relier_celery.store.client import Store

__all__ = ["Key", "Registry", "Verdict"]

logger = logging.getLogger("relier_celery")

Verdict = Literal["run", "duplicate", "parked", "quarantined", "deferred", "given_back"]


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
class Pending:
    key: Key
    finished: bool
    field: str | None  # set for a fetched delivery: its completion is dropping this field


class Registry:
    """What one worker's registry holds; the receipt and final-state sides extend it."""

    def __init__(
        self, config: RelierConfig, store: Store, worker: str, resurrector: Resurrector
    ) -> None:
        self.config = config
        self.store = store
        self.worker = worker
        self.resurrector = resurrector
        self.takeover = Takeover(store, worker, config.lease_ttl)
        self.local: dict[Key, TaskRecord] = {}
        self._lock = threading.Lock()
        self._pending: deque[Pending] = deque()
        self._store_down = False
        self.draining = False
        self.drain_completed = 0
        self.drain_stopped = 0  # running tasks the drain stopped, handed off as they ended
        # Deliveries whose pool process recorded the completion itself when the task
        # succeeded (completion.py); checked again, in one batch, by the heartbeat.
        self._done_in_pool: list[Key] = []
        # Deliveries whose receipt failed (Redis unreachable) -> until when a retry that finds
        # this worker's own record of it runs it (receipt.py).
        self._unsure_until: dict[Key, float] = {}
        self.accept = envelope.accepted(resurrector.app)
        # The worker's lease clock, set by the worker once its lease exists (the lease is made
        # after this registry: its loss gives up what this registry holds). give_up raises its
        # epoch; a fetched message whose fetch was sent under an older one is given back, not
        # run (receipt.py).
        self.clock: Any = None

    @staticmethod
    def key_of(message: Any) -> Key | None:
        headers = getattr(message, "headers", None)
        if not isinstance(headers, dict) or "id" not in headers:
            return None
        return Key.of(headers, getattr(message, "delivery_info", None))

    def holds(self, key: Key | None) -> bool:
        return key is not None and key in self.local

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

    def _receive_other(self, message: Any) -> Verdict:
        """A message without protocol-2 task headers: a protocol 1 task runs (Celery converts
        it), unprotected; anything else goes to the DLQ."""
        record = envelope.raw_record_of(message, self.worker)
        body = message.body
        if isinstance(message.headers, dict | None) and envelope.protocol_one(
            body, message.content_type, message.content_encoding, self.accept
        ):
            events.emit(
                events.TASK_UNPROTECTED,
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

    # -- Redis health -------------------------------------------------------------------
    def _mark_store_down(self, exc: Exception) -> None:
        if not self._store_down:
            self._store_down = True
            events.emit(
                events.STORE_UNAVAILABLE,
                f"{exc}. Messages stay unacked with the broker until Redis is back",
                worker=self.worker,
            )

    def _mark_store_up(self) -> None:
        if self._store_down:
            self._store_down = False
            events.emit(events.STORE_RECOVERED, "Redis is reachable again", worker=self.worker)
