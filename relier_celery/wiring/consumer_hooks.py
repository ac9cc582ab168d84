"""Wiring into Celery's consumer and requests: the message handlers relier wraps, so every
task message is checked and recorded before Celery sees it, anything Celery would drop is
quarantined, and each request's final callback removes its record (or hands it off, resurrects
it, or quarantines it). With ``bootsteps.py``, ``signals.py`` and ``kombu_guard.py``, the only
modules that touch Celery or kombu internals.
"""

from __future__ import annotations

import logging
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from celery.exceptions import (
    Ignore,
    Reject,
    Retry,
    TaskRevokedError,
    Terminated,
    TimeLimitExceeded,
    WorkerLostError,
)
from celery.worker import state as worker_state

from relier_celery.core import events
from relier_celery.core.errors import HardTimeout, IdempotencyInterrupted
from relier_celery.core.record import EPOCH_KEY, HELD_KEY, trace_context
from relier_celery.recovery.inflight import Inflight, Key
from relier_celery.recovery.lease import LeaseClock
from relier_celery.wiring.fetch import FIELD, PROTECTED

__all__ = ["wrap_consumer"]

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

        def on_task_received(message: Any) -> None:
            try:
                verdict = inflight.receive(message, c.strategies)
            except Exception as exc:
                # Contained: relier must never crash the consumer. A message relier's own
                # checks choke on is malformed: quarantined raw, or run if even that fails.
                logger.exception("relier: could not check a message")
                verdict = "quarantined" if _quarantine(message, exc) else "run"
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
            _wrap_request(req, key, inflight, clock)
            if key.generation.resurrections and _ahead_of_reserved(c, on_task_request, req):
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


def _ahead_of_reserved(c: Any, on_task_request: Any, req: Any) -> bool:
    """Put a task relier gave back (resurrected, handed off) first among the requests waiting
    for a pool slot, ahead of what this worker prefetched after it was first delivered; False
    when it needs no wait or the pool has no such queue (only prefork's semaphore has one)."""
    w = c.controller
    sem = getattr(w, "semaphore", None)
    process = getattr(type(w), "_process_task_sem", None)
    if sem is None or getattr(on_task_request, "__func__", None) is not process:
        return False
    if sem.value > 0:
        return False  # a slot is free: it starts now anyway
    sem._waiting.appendleft((w._process_task, (req,), {}))
    return True


def _wrap_request(req: Any, key: Key, inflight: Inflight, clock: LeaseClock) -> None:
    """Hook a request's final callbacks (instance attributes win over Celery's methods)."""
    on_success = req.on_success
    on_failure = req.on_failure
    reject = req.reject
    execute_using_pool = req.execute_using_pool

    def relier_execute_using_pool(pool: Any, **kwargs: Any) -> Any:
        if inflight.draining:
            # Intake has stopped: a task reaching the pool now is handed off, not started.
            inflight.hand_off_key(key, "it reached the pool while its worker was draining")
            worker_state.task_ready(req)
            if not req.acknowledged:
                req.acknowledge()
            raise TaskRevokedError(req.id)  # Celery then frees the pool slot it had taken
        if not inflight.to_pool(key, req.request_dict, clock.epoch):
            # Given up when this worker lost its lease (or handed off): it runs elsewhere.
            events.emit(
                "task.fenced",
                f"{req.name}[{req.id}] is no longer this worker's (given up when its lease "
                "was lost): not started here",
                task_id=req.id,
                task_name=req.name,
                worker=inflight.worker,
            )
            worker_state.task_ready(req)
            if not req.acknowledged:
                req.acknowledge()
            raise TaskRevokedError(req.id)
        return execute_using_pool(pool, **kwargs)

    def relier_on_success(failed__retval__runtime: Any, **kwargs: Any) -> Any:
        if not failed__retval__runtime[0]:
            # With HELD_KEY stamped, the pool process dropped the record itself (completion.py).
            inflight.finish(key, in_pool=HELD_KEY in req.request_dict)
        # A failure is routed by Celery to req.on_failure, our wrapper below.
        return on_success(failed__retval__runtime, **kwargs)

    def relier_on_failure(
        exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):  # how a pool process sends its exception
            exc = exc.exc
        lost = isinstance(exc, WorkerLostError) or (
            isinstance(exc, SystemExit | KeyboardInterrupt)
            and not req._already_cancelled
            and not req._already_revoked
        )
        cancelled = isinstance(exc, Terminated) and req._already_cancelled
        if cancelled or (inflight.draining and (lost or isinstance(exc, Terminated))):
            # Stopped by the drain, or cancelled by Celery's own cold shutdown (which would
            # lose it with acks_late off): hand it off, not a crash.
            try:
                inflight.hand_off_stopped(key, "its worker stopped it while draining")
            except Exception:
                logger.exception("relier: hand-off of %s[%s] failed", req.name, req.id)
            worker_state.task_ready(req)
            if not req.acknowledged:
                req.acknowledge()
            return None
        if lost:
            try:
                inflight.worker_lost(key)
            except Exception:
                logger.exception(
                    "relier: could not resurrect %s[%s] after its pool process "
                    "died; Celery handles the failure",
                    req.name,
                    req.id,
                )
            else:
                worker_state.task_ready(req)
                if not req.acknowledged:
                    req.acknowledge()
                return None
        if isinstance(exc, TimeLimitExceeded):
            events.emit(
                "task.timeout",
                f"{req.name}[{req.id}] passed its hard timeout and was stopped by Celery's "
                "time limit: a failure, not a resurrection",
                task_id=req.id,
                task_name=req.name,
                timeout_type="hard",
                **trace_context(getattr(req, "request_dict", None)),
            )
        reason = _dlq_reason(req, exc, inflight.config.dlq_on_failure)
        if reason is not None:
            try:
                inflight.quarantine_held(
                    key,
                    reason,
                    f"{exc!r}\n{exc_info.traceback or ''}",
                    exception=type(exc).__name__,
                )
            except Exception:
                logger.exception("relier: could not quarantine %s[%s]", req.name, req.id)
        if not _celery_requeues(req, exc):
            inflight.finish(key)
        # else Celery gives the message back through req.reject, our wrapper below.
        return on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def relier_reject(requeue: bool = False) -> Any:
        if requeue and not req.acknowledged:
            # The broker gets the message back: its next delivery must not be a duplicate
            # (with the reliable fetch, the record itself moves back to the queue).
            inflight.requeued(key)
        else:
            inflight.finish(key)  # dropped, or acked already: Celery lets it go
        return reject(requeue=requeue)

    req.execute_using_pool = relier_execute_using_pool
    req.on_success = relier_on_success
    req.on_failure = relier_on_failure
    req.reject = relier_reject


def _celery_requeues(req: Any, exc: BaseException) -> bool:
    """Whether Celery's on_failure gives the message back to the broker (req.reject with
    requeue): a Reject(requeue=True), or a hard time limit with acks_late and no ack on it."""
    if isinstance(exc, Reject):
        return bool(exc.requeue)
    task = req.task
    return bool(isinstance(exc, TimeLimitExceeded) and task.acks_late and not task.acks_on_timeout)


def _dlq_reason(req: Any, exc: BaseException, dlq_on_failure: bool) -> str | None:
    """Why a failed request goes to the DLQ, or None when it does not: a retry, an ignore or
    a requeue by Celery is not final, and failures go only with dlq_on_failure on."""
    if isinstance(exc, IdempotencyInterrupted):
        return "idempotency_interrupted"
    if isinstance(exc, Retry | Ignore | Terminated | TaskRevokedError):
        return None
    task = req.task
    if isinstance(exc, Reject):
        if exc.requeue:
            return None
        reason = "rejected"
    elif isinstance(exc, TimeLimitExceeded | HardTimeout):
        if isinstance(exc, TimeLimitExceeded) and task.acks_late and not task.acks_on_timeout:
            return None  # Celery gives the message back to the broker
        reason = "hard_timeout"
    else:
        reason = "exception"
    option = getattr(task, "dlq_on_failure", None)
    return reason if (dlq_on_failure if option is None else option) else None
