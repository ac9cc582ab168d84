"""Wiring into Celery's worker: the only module, with ``signals.py``, that touches Celery
internals.

``RelierWorker`` (worker blueprint) validates the configuration, takes the lease and starts
the heartbeat and the scanner. ``RelierConsumer`` (consumer blueprint) wraps the consumer's
message handler, so every task message is recorded before Celery sees it, and each request's
callbacks, so every final state removes its record. Both survive a consumer restart: the
wrapping is done once per consumer object, and a restart republishes what Celery forgot.
"""

from __future__ import annotations

import logging
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from celery import bootsteps
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

from . import control as _control  # noqa: F401  (registers the relier_drain command)
from . import events, kombu_guard, observe
from .activity import RunningMarker
from .config import validate_task_options
from .drain import Drain
from .envelope import check_migrations
from .errors import HardTimeout, IdempotencyInterrupted
from .inflight import Inflight, Key
from .lease import Lease
from .plugin import install, new_worker_id, set_worker_id
from .record import trace_context
from .resurrect import Resurrector
from .timeouts import HARD_LIMIT_ENFORCED, is_async, task_limits

__all__ = ["RelierConsumer", "RelierWorker", "WorkerRuntime"]

logger = logging.getLogger("relier_celery")


class WorkerRuntime:
    """Relier's state in one worker process."""

    current: WorkerRuntime | None = None

    def __init__(self, app: Any, hostname: str, pool_cls: Any = None) -> None:
        relier = install(app)
        validate_task_options(app)
        check_migrations(app)
        _apply_hard_timeouts(app, pool_cls)
        self.app = app
        self.config = relier.config
        self.store = relier.store
        self.worker_id = new_worker_id(hostname)
        set_worker_id(self.worker_id)
        self.resurrector = Resurrector(
            app, self.config, self.store, name=f"scanner@{self.worker_id}"
        )
        self.inflight = Inflight(self.config, self.store, self.worker_id, self.resurrector)
        # Counters in Redis, and OpenTelemetry if enabled: subscribed before the pool forks.
        self.observers = observe.start(relier)
        self.running = RunningMarker(
            self.store, self.worker_id, self.config.lease_ttl, _running_requests
        )
        self.lease = Lease(self.config, self.store, self.worker_id, on_renewed=self._on_heartbeat)
        self.pool_cls = pool_cls
        self.drain = Drain(self)
        self.started = False

    def _on_heartbeat(self) -> None:
        self.inflight.flush()
        self.running.publish()

    def start(self) -> None:
        for warning in self.store.self_check():
            events.emit("config.warning", warning)
        self.lease.acquire()
        kombu_guard.install(self)
        self.running.publish()  # "idle" / "reserved" from the start, not "held"
        if self.config.scanner_enabled:
            self.resurrector.start()
        self.started = True
        WorkerRuntime.current = self
        events.emit(
            "worker.started",
            f"lease {self.worker_id} taken (Redis "
            f"{self.config.describe()['relier_redis_url']}, prefix "
            f"{self.config.prefix!r})",
            worker=self.worker_id,
        )

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        if self.drain.started:
            self.drain.wait(self.config.drain_timeout + 30)
        self.resurrector.stop()
        handed = 0
        try:
            self.inflight.flush()
            # The pool has finished (warm shutdown): what is still held never started.
            handed = self.inflight.hand_off()
        except Exception as exc:
            logger.error("relier: hand-off at shutdown failed (%r); the scanners take over", exc)
        try:
            left = self.lease.release()
        except Exception as exc:
            events.emit(
                "store.unavailable",
                f"could not retire the lease: {exc}; it will "
                "expire by itself and any record left is resurrected",
                worker=self.worker_id,
            )
            self.observers.close()
            return
        events.emit(
            "worker.stopped",
            f"lease {self.worker_id} retired; {handed} task(s) handed off, {left} record(s) "
            "left for the scanners",
            worker=self.worker_id,
            handed_off=handed,
            left=left,
        )
        self.observers.close()


class RelierWorker(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker step: configuration check, lease, heartbeat and scanner."""

    label = "relier"
    requires = ("celery.worker.components:Timer",)

    def __init__(self, w: Any, **kwargs: Any) -> None:
        super().__init__(w, **kwargs)
        # Raises ConfigError on a bad setting: the worker refuses to start.
        w.relier = WorkerRuntime(w.app, w.hostname, w.pool_cls)
        _drain_before_cold_shutdown(w)

    def start(self, w: Any) -> None:
        # Raises StoreUnavailable when Redis is down: Celery logs it and exits non-zero.
        w.relier.start()

    # Stopping happens on the worker_shutdown signal, after the pool finished its tasks:
    # retiring the lease any earlier would let a scanner resurrect tasks still running here.


class RelierConsumer(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer step: record on receipt, forget on completion, recover after a restart."""

    label = "relier consumer"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.runtime: WorkerRuntime | None = getattr(c.controller, "relier", None)
        self.first_start = True
        if self.runtime is not None and not getattr(c, "_relier_wrapped", False):
            _wrap_consumer(c, self.runtime.inflight)
            c._relier_wrapped = True

    def start(self, c: Any) -> None:
        if self.runtime is None:
            return
        if self.first_start:
            self.first_start = False
            return
        running = {r.id for r in worker_state.active_requests}
        count = self.runtime.inflight.recover_after_restart(running)
        if count:
            logger.warning(
                "relier: consumer restarted; republished %d reserved task(s) that Celery forgot",
                count,
            )


def _running_requests() -> dict[str, float]:
    """Task id -> start time (s since the epoch) of what the pool runs now."""
    out: dict[str, float] = {}
    for req in list(worker_state.active_requests):
        out[str(req.id)] = float(req.time_start or 0.0)
    return out


def _wrap_consumer(c: Any, inflight: Inflight) -> None:
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
            _wrap_request(req, key, inflight)
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


def _wrap_request(req: Any, key: Key, inflight: Inflight) -> None:
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
        return execute_using_pool(pool, **kwargs)

    def relier_on_success(failed__retval__runtime: Any, **kwargs: Any) -> Any:
        if not failed__retval__runtime[0]:
            inflight.finish(key)
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
                inflight.hand_off_key(key, "its worker stopped it while draining")
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
        inflight.finish(key)
        return on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def relier_reject(requeue: bool = False) -> Any:
        if requeue:
            # The broker gets the message back: its next delivery must not be a duplicate.
            inflight.requeued(key)
        return reject(requeue=requeue)

    req.execute_using_pool = relier_execute_using_pool
    req.on_success = relier_on_success
    req.on_failure = relier_on_failure
    req.reject = relier_reject


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


def _apply_hard_timeouts(app: Any, pool_cls: Any) -> None:
    """Sync tasks' hard timeouts become Celery's own time_limit, which only the prefork pool
    enforces (by killing the pool process); elsewhere relier can only report them."""
    from celery.concurrency.prefork import TaskPool as Prefork

    prefork = isinstance(pool_cls, type) and issubclass(pool_cls, Prefork)
    HARD_LIMIT_ENFORCED["value"] = prefork
    for name, task in sorted(app.tasks.items()):
        hard = task_limits(task).hard
        if hard is None or is_async(task):
            continue
        if not prefork:
            logger.warning(
                "relier: task %s has a hard timeout of %s s, but a sync task cannot be "
                "interrupted in this pool (%s): it will be reported, not stopped",
                name,
                hard,
                getattr(pool_cls, "__name__", pool_cls),
            )
        elif task.time_limit is None or task.time_limit > hard:
            task.time_limit = hard


def _drain_before_cold_shutdown(w: Any) -> None:
    """Celery's cold (and soft) shutdown waits worker_soft_shutdown_timeout, then cancels what
    runs, from its signal handler, before it reports the shutdown: relier drains first, so a
    SIGTERM remapped to SIGQUIT, or a Ctrl-C, ends the same way as a plain SIGTERM."""
    wait_for_soft_shutdown = w.wait_for_soft_shutdown

    def relier_wait_for_soft_shutdown() -> Any:
        runtime: WorkerRuntime = w.relier
        if runtime.started:
            runtime.drain.begin("cold or soft shutdown")
            runtime.drain.wait(runtime.config.drain_timeout + 10)
        return wait_for_soft_shutdown()

    w.wait_for_soft_shutdown = relier_wait_for_soft_shutdown
