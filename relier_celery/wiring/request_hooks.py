"""Wiring into Celery's requests: each request's final callbacks (success, failure, reject,
the pool hand-over) are hooked so that every final state removes the delivery's record, or
hands it off, resurrects it, or quarantines it; and which failures go to the DLQ.
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
from relier_celery.core.headers import HELD_KEY
from relier_celery.core.record import trace_context
from relier_celery.recovery.inflight import Inflight, Key
from relier_celery.recovery.lease import LeaseClock

__all__ = ["celery_requeues", "dlq_reason", "wrap_request"]

logger = logging.getLogger("relier_celery")


def wrap_request(req: Any, key: Key, inflight: Inflight, clock: LeaseClock) -> None:
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
                events.TASK_FENCED,
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
                events.TASK_TIMEOUT,
                f"{req.name}[{req.id}] passed its hard timeout and was stopped by Celery's "
                "time limit: a failure, not a resurrection",
                task_id=req.id,
                task_name=req.name,
                timeout_type="hard",
                **trace_context(getattr(req, "request_dict", None)),
            )
        reason = dlq_reason(req, exc, inflight.config.dlq_on_failure)
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
        if not celery_requeues(req, exc):
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


def celery_requeues(req: Any, exc: BaseException) -> bool:
    """Whether Celery's on_failure gives the message back to the broker (req.reject with
    requeue): a Reject(requeue=True), or a hard time limit with acks_late and no ack on it."""
    if isinstance(exc, Reject):
        return bool(exc.requeue)
    task = req.task
    return bool(isinstance(exc, TimeLimitExceeded) and task.acks_late and not task.acks_on_timeout)


def dlq_reason(req: Any, exc: BaseException, dlq_on_failure: bool) -> str | None:
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
