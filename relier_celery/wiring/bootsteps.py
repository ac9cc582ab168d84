"""Wiring into Celery's worker: with ``consumer_hooks.py``, ``signals.py`` and
``kombu_guard.py``, the only modules that touch Celery or kombu internals.

``RelierWorker`` (worker blueprint) validates the configuration, takes the lease and starts
the heartbeat and the scanner. ``RelierConsumer`` (consumer blueprint) wraps the consumer's
message handlers (``consumer_hooks.py``), so every task message is recorded before Celery sees
it, and each request's callbacks, so every final state removes its record. Both survive a
consumer restart: the wrapping is done once per consumer object, and a restart republishes
what Celery forgot.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import bootsteps
from celery.worker import state as worker_state

from relier_celery.core import events
from relier_celery.features.timeouts import is_async, task_limits
from relier_celery.observe import subscribers as observe
from relier_celery.observe.activity import RunningMarker
from relier_celery.recovery.inflight import Inflight
from relier_celery.recovery.lease import Lease, attach_clock
from relier_celery.recovery.loop_heartbeat import LoopHeartbeat
from relier_celery.recovery.resurrect import Resurrector
from relier_celery.recovery.schema import check_migrations
from relier_celery.wiring import control as _control  # noqa: F401  (registers the relier_drain command)
from relier_celery.wiring import kombu_guard
from relier_celery.wiring.consumer_hooks import keep_running_jobs, wrap_consumer
from relier_celery.wiring.drain import Drain
from relier_celery.wiring.fence import give_up
from relier_celery.wiring.fetch_transport import enable_for_consumer
from relier_celery.wiring.huge_pages import HugeHeap
from relier_celery.wiring.install import install, new_worker_id
from relier_celery.wiring.task_options import validate_task_options

__all__ = ["RelierConsumer", "RelierWorker", "WorkerRuntime"]

logger = logging.getLogger("relier_celery")


class WorkerRuntime:
    """Relier's state in one worker process."""

    def __init__(self, app: Any, hostname: str, pool_cls: Any = None) -> None:
        relier = install(app)
        validate_task_options(app)
        check_migrations(app)
        _apply_hard_timeouts(app, pool_cls)
        self.app = app
        self.config = relier.config
        self.store = relier.store
        self.worker_id = new_worker_id(hostname)
        relier.worker_id = self.worker_id  # before the pool forks: idempotency claims name it
        # Also before the fork: a pool process connects to a cluster through the nodes met
        # here, not only relier_redis_url's node (a primary that a failover may have killed).
        self.store.meet_cluster()
        self.resurrector = Resurrector(
            app, self.config, self.store, name=f"scanner@{self.worker_id}"
        )
        self.inflight = Inflight(self.config, self.store, self.worker_id, self.resurrector)
        # Counters in Redis, and OpenTelemetry if enabled: subscribed before the pool forks.
        self.observers = observe.start(relier)
        self.running = RunningMarker(
            self.store, self.worker_id, self.config.lease_ttl, _running_requests, _completed
        )
        self.lease = Lease(
            self.config,
            self.store,
            self.worker_id,
            on_renewed=self._on_heartbeat,
            on_lost=lambda: give_up(self),
        )
        attach_clock(app, self.lease.clock)  # before the pool forks: its processes share it
        self.inflight.clock = self.lease.clock
        self.pool_cls = pool_cls
        self.prefork = _is_prefork(pool_cls)
        self.drain = Drain(self)
        self.heartbeat: LoopHeartbeat | None = None
        self.loop: Any = None  # a prefork worker's event loop (kombu's hub), once started
        self.huge_heap: HugeHeap | None = None  # once the worker is ready (huge_pages.py)
        self.started = False

    def rearm_loop_timers(self) -> None:
        """After a consumer restart: the heartbeat's, the scanner's and the counters' timers
        on the event loop, registered again (Celery 5.6 clears the hub's timer then)."""
        if self.loop is None:
            return
        if self.heartbeat is not None:
            self.heartbeat.rearm()
        self.observers.counters.rearm(self.loop)
        self.resurrector.rearm(self.loop)

    def _on_heartbeat(self) -> None:
        self.inflight.flush()
        self.running.publish()
        if self.huge_heap is not None:
            self.huge_heap.tick()

    def start(self, hub: Any = None) -> None:
        for warning in self.store.self_check():
            events.emit(events.CONFIG_WARNING, warning)
        self.lease.acquire()
        # A prefork worker's main process runs no thread of relier's while its event loop
        # (``hub``) turns: the heartbeat, the scanner and the counters run on it. A SIGKILLed
        # process with more threads was measured to die slower, and RabbitMQ redelivers its
        # messages only once its sockets are closed (docs/rabbitmq-recovery.md). While the loop
        # stands still, the heartbeat runs in a thread (loop_heartbeat.py).
        loop = self.loop = hub if self.prefork else None
        if loop is not None:
            if threading.current_thread() is threading.main_thread():  # SIGALRM's
                self.heartbeat = LoopHeartbeat(self.lease, loop)
                self.heartbeat.start()
            self.observers.counters.start(loop)
        kombu_guard.guard_transport(self)
        self.running.publish()  # "idle" / "reserved" from the start, not "held"
        if self.config.scanner_enabled:
            self.resurrector.start(loop)
        self.started = True
        install(self.app).worker = self  # the signal handlers reach the drain through it
        events.emit(
            events.WORKER_STARTED,
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
        if self.heartbeat is not None:
            self.heartbeat.stop()
        try:
            left = self.lease.release()
        except Exception as exc:
            events.emit(
                events.STORE_UNAVAILABLE,
                f"could not retire the lease: {exc}; it will "
                "expire by itself and any record left is resurrected",
                worker=self.worker_id,
            )
            self.observers.close()
            return
        events.emit(
            events.WORKER_STOPPED,
            f"lease {self.worker_id} retired; {handed} task(s) handed off, {left} record(s) "
            "left for the scanners",
            worker=self.worker_id,
            handed_off=handed,
            left=left,
        )
        self.observers.close()


class RelierWorker(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker step: configuration check, lease, heartbeat and scanner."""

    # The step's name as before the package had layers, so logs and ``requires`` keep it.
    name = "relier_celery.bootsteps.RelierWorker"
    label = "relier"
    requires = ("celery.worker.components:Timer",)

    def __init__(self, w: Any, **kwargs: Any) -> None:
        super().__init__(w, **kwargs)
        # Raises ConfigError on a bad setting: the worker refuses to start.
        w.relier = WorkerRuntime(w.app, w.hostname, w.pool_cls)
        _drain_before_cold_shutdown(w)

    def start(self, w: Any) -> None:
        # Raises StoreUnavailable when Redis is down: Celery logs it and exits non-zero.
        w.relier.start(getattr(w, "hub", None))

    # Stopping happens on the worker_shutdown signal, after the pool finished its tasks:
    # retiring the lease any earlier would let a scanner resurrect tasks still running here.


class RelierConsumer(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer step: record on receipt, forget on completion, recover after a restart."""

    name = "relier_celery.bootsteps.RelierConsumer"
    label = "relier consumer"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.runtime: WorkerRuntime | None = getattr(c.controller, "relier", None)
        self.first_start = True
        if self.runtime is not None and not getattr(c, "_relier_wrapped", False):
            wrap_consumer(c, self.runtime.inflight, self.runtime.lease.clock)
            keep_running_jobs(c)
            enable_for_consumer(c, self.runtime)
            c._relier_wrapped = True

    def stop(self, c: Any) -> None:
        # The consumer restarts or stops: its event loop stands still meanwhile.
        if self.runtime is not None and self.runtime.heartbeat is not None:
            self.runtime.heartbeat.loop_stopped()

    def shutdown(self, c: Any) -> None:
        if self.runtime is not None and self.runtime.heartbeat is not None:
            self.runtime.heartbeat.hand_to_thread()

    def start(self, c: Any) -> None:
        if self.runtime is None:
            return
        if self.first_start:
            self.first_start = False
            return
        self.runtime.rearm_loop_timers()
        inflight = self.runtime.inflight
        keys = (inflight.key_of(getattr(r, "message", None)) for r in worker_state.active_requests)
        count = inflight.recover_after_restart({k for k in keys if k is not None})
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


def _completed() -> int:
    """Tasks this worker's pool started and finished since the worker started."""
    return max(int(worker_state.all_total_count[0]) - len(worker_state.active_requests), 0)


def _is_prefork(pool_cls: Any) -> bool:
    from celery.concurrency.prefork import TaskPool as Prefork

    return isinstance(pool_cls, type) and issubclass(pool_cls, Prefork)


def _apply_hard_timeouts(app: Any, pool_cls: Any) -> None:
    """Sync tasks' hard timeouts become Celery's own time_limit, which only the prefork pool
    enforces (by killing the pool process); elsewhere relier can only report them."""
    prefork = _is_prefork(pool_cls)
    install(app).hard_limit_enforced = prefork
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
