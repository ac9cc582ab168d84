"""Speculation: a broker's redelivery goes to the pool while its receipt is on its way.

RabbitMQ gives a dead worker's messages back at once; each must have its receipt (one Redis
round trip: is the holder gone?) before it runs, so that a live holder's task never runs twice.
At a kill that round trip, on CPUs the dying processes hold, kept relier behind vanilla Celery
(docs/rabbitmq.md). So the consumer hands the message to Celery at once, sends its receipt
after, reads the reply on the event loop, and the pool process waits for the verdict before
the task's body (verdicts.py): "run", it runs as if received the usual way; anything else, it
stops itself, and the request is acked as a lost one relier holds no record of. Only where
safe (docs/rabbitmq.md says why each): prefork, acks_late, no ETA or rate limit, this worker's
schema, py-amqp, one Redis; paused after a "do not run".
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from redis.exceptions import NoScriptError

from relier_celery.core.errors import StoreUnavailable
from relier_celery.core.headers import AHEAD, FETCH_FIELD
from relier_celery.recovery import envelope, schema
from relier_celery.recovery.registry import Key
from relier_celery.recovery.takeover import resume
from relier_celery.recovery.verdicts import VerdictRing
from relier_celery.store.receipt_pipe import ReceiptPipe

__all__ = ["Speculation"]

logger = logging.getLogger("relier_celery")

# How long redeliveries take the usual path after a "do not run", or a consumer restart.
PAUSE = 10.0
# How long a receipt Redis did not answer waits before it is sent again (as a parked one).
RETRY = 1.0


class Speculation:
    """One prefork worker's redeliveries handed to the pool ahead of their receipts."""

    def __init__(self, inflight: Any, ring: VerdictRing) -> None:
        self.inflight = inflight
        self.ring = ring
        self.paused_until = 0.0
        # Keys in Celery's handler (open() to handed()); of them, those Celery made a request
        # of, those decided "do not run" meanwhile; those Celery took without a request.
        self._handing: set[Key] = set()
        self._wrapped: set[Key] = set()
        self._dropped: set[Key] = set()
        self._orphans: set[Key] = set()
        self._requeue_on_verdict: set[Key] = set()
        # Receipts Redis did not answer, asked again later: key -> (message, number).
        self._parked: dict[Key, tuple[Any, int]] = {}
        self.pipe = ReceiptPipe(inflight.store)
        self.hub: Any = None
        self.known: Any = None  # Celery's task strategies: the names it can run
        self._unsent: Callable[[], list[Any]] = list
        self._watched: int | None = None
        # Receipts sent, their replies not read yet, in order: (step, key, number, ask).
        self._waiting: deque[tuple[Any, Key, int, Any]] = deque()

    def pause(self) -> None:
        self.paused_until = time.monotonic() + PAUSE

    def may(self, c: Any, message: Any) -> bool:
        """Whether ``message`` may go to the pool before its receipt's verdict."""
        info = message.delivery_info or {}
        headers = message.headers
        inflight = self.inflight
        if not info.get("redelivered") or FETCH_FIELD in info or not isinstance(headers, dict):
            return False
        if inflight.draining or inflight._store_down or inflight.store.cluster is not None:
            return False
        # At most one per pool process: beyond that a redelivery would wait for a free
        # process anyway, and a live holder's burst stops no more processes than there are.
        limit = getattr(c.controller, "concurrency", None) or 1
        if len(inflight.speculating) >= limit or time.monotonic() < self.paused_until:
            return False
        if headers.get("eta") or getattr(c.connection.transport, "driver_type", "") != "amqp":
            return False
        task = c.app.tasks.get(headers.get("task"))
        if task is None or not task.acks_late or headers.get("task") not in c.strategies:
            return False
        if task.rate_limit and not c.app.conf.worker_disable_rate_limits:
            return False
        try:
            return envelope.message_version(headers) == schema.schema_version(task)
        except envelope.BadMessage:
            return False

    def open(self, message: Any) -> tuple[Key, int] | None:
        """Before Celery's handler: ``message``'s key pending, its verdict's number (the
        pool process waits on it: ``rl_spec``, stamped by ``to_pool``); None: not here."""
        key = self.inflight.key_of(message)
        if key is None:
            return None
        message.delivery_info[AHEAD] = True  # for the takeover's event
        seq = self.ring.open()
        with self.inflight._lock:
            self.inflight.speculating[key] = seq
            self._handing.add(key)
        return key, seq

    def attach(self, hub: Any, known: Any, unsent: Callable[[], list[Any]]) -> None:
        """A consumer (re)started: its event loop, the tasks it knows, and how to take the
        messages handed ahead whose receipts are not sent yet (the consumer's burst). The
        parked receipts are asked again on this loop (a restart may have cleared its timers)."""
        self.hub, self.known, self._unsent = hub, known, unsent
        for key, (message, seq) in list(self._parked.items()):
            self._park(message, key, seq)

    def send(self, opened: list[tuple[Any, Key, int]]) -> None:
        """After Celery's handler (and those of the burst's other messages, burst.py: the
        pool gets them first): each message's checks and receipt (receipt.py), the receipts
        sent without waiting, their replies read on Celery's event loop."""
        hub = self.hub
        calls = []
        for message, key, seq in opened:
            step = self._prepare(message, key, seq)
            if step is None:
                continue
            try:
                ask = self.inflight.takeover.ask(step.message, step.record)
                calls.append(next(ask))
            except Exception as exc:
                step.receipt = exc
                self._conclude(step, key, seq)
                continue
            self._waiting.append((step, key, seq, ask))
        if not calls:
            return
        try:
            self.pipe.send(calls)
        except Exception as exc:  # never the consumer's crash: asked again, as parked
            logger.warning("relier: could not send receipts: %r", exc)
            self._lose_all(StoreUnavailable(f"relier could not send receipts: {exc!r}"))
            return
        if self._watched is None:
            self._watched = self.pipe.fileno()
            hub.add_reader(self._watched, self._on_readable)

    def _prepare(self, message: Any, key: Key, seq: int) -> Any:
        """The message's checks before its receipt; None when they decided it already."""
        try:
            step = self.inflight._prepare(message, self.known)
        except Exception as exc:
            step = self._check_failed(message, exc)
        if not isinstance(step, str):
            return step
        if step == "parked":
            self._park(message, key, seq)
        else:
            self._decide(key, seq, step == "run")
        return None

    def _park(self, message: Any, key: Key, seq: int) -> None:
        """Redis unreachable: asked again later; the pool process waits."""
        self._parked[key] = (message, seq)
        self.hub.call_later(RETRY, lambda: self._again(message, key, seq))

    def lost(self, key: Key | None) -> bool:
        """Its pool process was lost before the verdict: True if the message must go back to
        the broker (acked, it would be lost), and a "run" verdict then forgets the record
        without marking it finished, so that the broker's next delivery of it runs."""
        with self.inflight._lock:
            if key is None or key not in self.inflight.speculating:
                return False
            self._requeue_on_verdict.add(key)
            return True

    def cancel(self, key: Key, seq: int) -> None:
        self._decide(key, seq, False)  # Celery could not take it (quarantined): no receipt

    def at_request(self, key: Key | None) -> bool:
        """Celery made ``key``'s request: False if it must not run (its verdict came first,
        and it was not "run"), else True."""
        if key not in self._handing:  # the consumer's own set: no lock for every request
            return True
        with self.inflight._lock:
            self._wrapped.add(key)
            return key not in self._dropped

    def handed(self, key: Key) -> None:
        """After Celery's handler returned: a message Celery took without making a request
        of it (revoked, expired) has no request to end it; a "run" verdict then finishes it."""
        with self.inflight._lock:
            self._handing.discard(key)
            self._dropped.discard(key)
            if key in self._wrapped:
                self._wrapped.discard(key)
                return
            if key in self.inflight.speculating:
                self._orphans.add(key)
                return
        if self.inflight.holds(key):
            self.inflight.finish(key)

    def settle(self, timeout: float) -> None:
        """Wait (at most ``timeout``) for the receipts under way (a drain's start)."""
        deadline = time.monotonic() + timeout
        while self.inflight.speculating and time.monotonic() < deadline:
            time.sleep(0.01)

    def flush(self) -> None:
        """The event loop stops (a consumer restart, the worker's shutdown): read every reply
        still awaited, waiting for them, and ask once more for the parked ones (their timers
        may be cleared with the loop's). Still unanswered (Redis down), their pool processes
        wait; one stopped by a cold shutdown gives its message back (:meth:`lost`)."""
        self.send(self._unsent())
        self._unwatch()
        while self._waiting:
            self._read_one()
        for key, (message, seq) in list(self._parked.items()):
            self._again(message, key, seq)

    def _on_readable(self) -> None:
        while self._waiting and self.pipe.ready():
            self._read_one()
        if not self._waiting:
            self._unwatch()

    def _unwatch(self) -> None:
        if self._watched is not None:
            self.hub.remove_reader(self._watched)
        self._watched = None

    def _read_one(self) -> None:
        step, key, seq, ask = self._waiting.popleft()
        try:
            got = self.pipe.read()
        except StoreUnavailable as exc:
            self._waiting.appendleft((step, key, seq, ask))
            self._lose_all(exc)
            return
        if isinstance(got, NoScriptError):  # Redis lost the script: that call did not run
            self._again(step.message, key, seq)
            return
        try:
            # A further call (rare: the holder's count differed, nobody held it, the holder
            # looked present): the rest of the receipt waits for its replies.
            step.receipt = resume(self.inflight.store, ask, got)
        except Exception as exc:
            step.receipt = exc
        self._conclude(step, key, seq)

    def _lose_all(self, exc: StoreUnavailable) -> None:
        """The connection is gone with every reply awaited: each call may have run."""
        lost, self._waiting = list(self._waiting), deque()
        self._unwatch()
        for step, key, seq, _ in lost:
            step.receipt = exc
            self._conclude(step, key, seq)

    def _again(self, message: Any, key: Key, seq: int) -> None:
        """The whole receipt again, waiting for it (receipt.py)."""
        if self._parked.pop(key, None) is None and key not in self.inflight.speculating:
            return  # decided meanwhile (flush)
        step = self._prepare(message, key, seq)
        if step is not None:
            (step.receipt,) = self.inflight._receipts([step])
            self._conclude(step, key, seq)

    def _conclude(self, step: Any, key: Key, seq: int) -> None:
        inflight = self.inflight
        try:
            verdict = inflight._finish(step)
        except Exception as exc:
            verdict = self._check_failed(step.message, exc)
        if verdict == "parked":
            self._park(step.message, key, seq)
        else:
            self._decide(key, seq, verdict == "run")

    def _check_failed(self, message: Any, exc: Exception) -> str:
        """Relier's own checks choked on it: quarantined raw, or run if even that fails (as
        consumer_hooks does for a message received the usual way)."""
        logger.error("relier: could not check a message", exc_info=exc)
        gone = self.inflight.quarantine_message(message, "invalid_message", repr(exc))
        return "quarantined" if gone else "run"

    def _decide(self, key: Key, seq: int, run: bool) -> None:
        with self.inflight._lock:
            self.inflight.speculating.pop(key, None)
            orphan = key in self._orphans
            self._orphans.discard(key)
            requeued = key in self._requeue_on_verdict
            self._requeue_on_verdict.discard(key)
            if not run and key in self._handing:
                self._dropped.add(key)
        self.ring.decide(seq, run)
        if not run:
            self.pause()
        elif requeued:
            self.inflight.requeued(key)
        elif orphan:
            self.inflight.finish(key)
