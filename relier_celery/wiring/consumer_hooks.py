"""Wiring into Celery's consumer and requests: the message handlers relier wraps, so every
task message is checked and recorded before Celery sees it, anything Celery would drop is
quarantined, and each request's final callback removes its record (or hands it off, resurrects
it, or quarantines it: request_hooks.py).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from relier_celery.core import events
from relier_celery.core.headers import EPOCH_KEY, HELD_KEY, PROTECTED
from relier_celery.recovery.inflight import Inflight, Key
from relier_celery.recovery.lease import LeaseClock
from relier_celery.wiring.burst import Burst
from relier_celery.wiring.fetch import FIELD
from relier_celery.wiring.request_hooks import wrap_request

__all__ = ["keep_running_jobs", "wrap_consumer"]

logger = logging.getLogger("relier_celery")


def wrap_consumer(c: Any, inflight: Inflight, clock: LeaseClock) -> None:
    create_task_handler = c.create_task_handler
    on_task_request = c.on_task_request
    on_invalid_task = c.on_invalid_task
    on_decode_error = c.on_decode_error
    on_unknown_message = c.on_unknown_message

    def relier_create_task_handler(*args: Any, **kwargs: Any) -> Any:
        handler = create_task_handler(*args, **kwargs)
        restart = c.restart_count

        burst = Burst(c)

        def on_task_received(message: Any) -> None:
            if not burst.keep(message, receive_burst):
                receive_burst()

        def receive_burst() -> None:
            messages = burst.take()
            if c.restart_count != restart:
                return  # that channel is gone, unrecorded; the broker gives them back
            try:
                verdicts = inflight.receive_many(messages, c.strategies)
            except Exception as exc:
                verdicts = [exc for _ in messages]
            for message, verdict in zip(messages, verdicts, strict=True):
                if isinstance(verdict, Exception):
                    # Contained: relier must never crash the consumer. A message relier's own
                    # checks choke on is malformed: quarantined raw, or run if even that fails.
                    logger.error("relier: could not check a message", exc_info=verdict)
                    verdict = "quarantined" if _quarantine(message, verdict) else "run"
                take(message, verdict)

        def take(message: Any, verdict: str) -> None:
            if verdict == "run":
                if FIELD in (message.delivery_info or {}) and inflight.holds(
                    inflight.key_of(message)
                ):
                    # Relier removes this record when the task ends, not Celery's ack.
                    message.delivery_info[PROTECTED] = True
                try:
                    handler(message)
                except c.connection_errors:
                    raise
                except Exception as exc:
                    # Celery's own handler would crash the worker (or restart its consumer,
                    # for a KeyError) and lose or loop the message: quarantine it instead.
                    logger.exception("relier: Celery could not take a message")
                    if _quarantine(message, exc):
                        message.ack_log_error(logger, c.connection_errors)
                    else:
                        raise
            elif verdict == "duplicate" or verdict == "quarantined":
                message.ack_log_error(logger, c.connection_errors)
            elif verdict == "given_back":
                # Fetched under a lease lost since: back to its queue (a no-op if a scanner
                # moved it already: requeue.lua), never run here.
                message.reject_log_error(logger, c.connection_errors, requeue=True)
            elif verdict == "deferred":
                _defer(message)
            elif verdict == "parked":
                _park(message)

        def _defer(message: Any) -> None:
            """A message from a newer schema waits, then goes back to the queue."""
            key = inflight.key_of(message)

            def requeue() -> None:
                if c.restart_count != restart or key is None:
                    return  # the restart recovery republished it already
                try:
                    inflight.requeue_for_newer(key)
                except Exception:
                    logger.exception("relier: requeue of %s failed; retrying", key)
                    c.timer.call_after(1.0, requeue)
                    return
                message.ack_log_error(logger, c.connection_errors)

            c.timer.call_after(inflight.config.schema_requeue_delay, requeue)

        def _park(message: Any) -> None:
            def retry() -> None:
                if c.restart_count != restart:
                    return  # that channel is gone; the broker gives the message back
                on_task_received(message)

            c.timer.call_after(1.0, retry)

        return on_task_received

    def relier_on_task_request(req: Any) -> Any:
        key = inflight.key_of(req.message)
        if inflight.holds(key):
            assert key is not None
            wrap_request(req, key, inflight, clock)
            if _given_back(key, req.message) and _ahead_of_reserved(c, on_task_request, req):
                return None
        elif FIELD in (req.message.delivery_info or {}):
            # Fetched and received, then given up before Celery made its request (the lease
            # was lost in between: give_up put it back or a scanner took it): not run here.
            events.emit(
                events.TASK_FENCED,
                f"{req.name}[{req.id}] was given up when this worker lost its lease, before "
                "Celery handed it to the pool: not run here",
                task_id=req.id,
                task_name=req.name,
            )
            req.message.ack_log_error(logger, c.connection_errors)
            return None
        else:
            # Not relier's to gate or complete, whatever headers it was published with.
            req.request_dict.pop(EPOCH_KEY, None)
            req.request_dict.pop(HELD_KEY, None)
        return on_task_request(req)

    def _quarantine(message: Any, exc: BaseException, reason: str = "invalid_message") -> bool:
        try:
            return inflight.quarantine_message(message, reason, f"{exc!r}")
        except Exception:
            logger.exception("relier: could not quarantine a malformed message")
            return False

    def relier_on_invalid_task(body: Any, message: Any, exc: Exception) -> Any:
        _quarantine(message, exc, "invalid_task")
        return on_invalid_task(body, message, exc)

    def relier_on_decode_error(message: Any, exc: Exception) -> Any:
        # kombu could not decompress or decode it; Celery would ack it with a log line.
        _quarantine(message, exc, "undecodable")
        return on_decode_error(message, exc)

    def relier_on_unknown_message(body: Any, message: Any) -> Any:
        _quarantine(message, ValueError("not a task message"), "invalid_message")
        return on_unknown_message(body, message)

    c.create_task_handler = relier_create_task_handler
    c.on_task_request = relier_on_task_request
    c.on_invalid_task = relier_on_invalid_task
    c.on_decode_error = relier_on_decode_error
    c.on_unknown_message = relier_on_unknown_message


def _given_back(key: Key | None, message: Any) -> bool:
    """Whether a delivery (``key``, of ``message``) was given back: resurrected or handed off
    (its generation says so), or redelivered by the broker."""
    return bool(key is not None and key.generation.resurrections) or _redelivered(message)


def _redelivered(message: Any) -> bool:
    """Whether the broker gave this message back: RabbitMQ puts a message whose consumer died
    or closed its channel back at the head of its queue (a takeover runs it). Not one relier's
    reliable fetch took (a Redis queue): one a task rejected with requeue went to the tail."""
    info = getattr(message, "delivery_info", None) or {}
    return bool(info.get("redelivered")) and FIELD not in info


def _ahead_of_reserved(c: Any, on_task_request: Any, req: Any) -> bool:
    """Put a task given back (resurrected, handed off, redelivered by the broker) first among
    the requests waiting for a pool slot, ahead of what this worker prefetched after it was
    first delivered: the broker put it at the head of its queue, and a worker that prefetched
    newer work would otherwise run all of that first; after the ones given back before it, in
    the order they came. False when it needs no wait or the pool has no such queue (only
    prefork's semaphore has one)."""
    w = c.controller
    sem = getattr(w, "semaphore", None)
    process = getattr(type(w), "_process_task_sem", None)
    if sem is None or getattr(on_task_request, "__func__", None) is not process:
        return False
    if sem.value > 0:
        return False  # a slot is free: it starts now anyway
    waiting = getattr(sem, "_waiting", None)  # kombu's LaxBoundedSemaphore keeps a deque
    if not isinstance(waiting, deque):
        return False  # another kombu: the request waits in the semaphore's own order
    first = 0
    while first < len(waiting) and _waiter_given_back(waiting[first]):
        first += 1
    waiting.insert(first, (w._process_task, (req,), {}))
    return True


def _waiter_given_back(entry: tuple[Any, tuple[Any, ...], dict[str, Any]]) -> bool:
    """Whether a waiter of the semaphore, (function, args, kwargs), starts a request that
    was given back."""
    args = entry[1]
    message = getattr(args[0], "message", None) if args else None
    return message is not None and _given_back(Inflight.key_of(message), message)


def keep_running_jobs(c: Any) -> None:
    """Celery 5.5's prefork pool forgets the jobs it runs when the consumer loses its broker
    connection (``Consumer.on_close`` calls ``AsynPool.flush``, which clears the whole job
    cache; 5.7 drops only the jobs no pool process accepted). Their results are then dropped:
    their requests never end, so relier never removes their records. Put them back."""
    on_close = c.on_close

    def relier_on_close() -> Any:
        cache = getattr(getattr(c.pool, "_pool", None), "_cache", None)
        if not isinstance(cache, dict):
            return on_close()  # not a prefork pool
        running = {job: r for job, r in cache.items() if getattr(r, "_accepted", False)}
        try:
            return on_close()
        finally:
            for job, result in running.items():
                cache.setdefault(job, result)

    c.on_close = relier_on_close
