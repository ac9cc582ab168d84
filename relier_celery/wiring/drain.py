"""Graceful drain: nothing lost on deploy.

On SIGTERM (any shutdown signal Celery reports, whatever ``REMAP_SIGTERM`` or soft-shutdown
settings say) or the ``relier_drain`` remote command, the worker drains:

1. Intake stops (Celery's shutdown stops the consumer; relier also refuses to start any task
   that reaches the pool from now on and hands it off instead).
2. What has not started (prefetched, reserved, ETA) is handed off at once: republished from
   relier's record as the next generation (not a crash), so another worker runs it now.
3. Running tasks get ``relier_drain_timeout`` seconds to finish.
4. What still runs then is stopped first (prefork: its pool processes are SIGKILLed, and each
   is handed off as Celery reports it lost), so a task is never both finished here and handed
   off; what is still recorded then is handed off. Threads and solo: a running thread cannot be
   stopped, so the rest is handed off and the process exits at once.
5. One accounting line: ``completed N, handed off M, returned K, lost 0``.

Progress is kept in Redis so ``celery -A app relier drain`` can report it per worker, with one
field per running task as it ends (``task:<id>``: its name, ``completed`` or ``handed_off``, and
how long it ran), so ``rl worker drain`` prints a line per task. A second
shutdown signal during the drain ends the waiting at once: the hand-off goes on, quickly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

from relier_celery.core import events
from relier_celery.features.timeouts import fire_drain_hooks
from relier_celery.wiring.fence import kill_pool_tasks

if TYPE_CHECKING:
    from relier_celery.wiring.bootsteps import WorkerRuntime

__all__ = ["Drain"]

logger = logging.getLogger("relier_celery")

# How often progress is written to Redis while waiting for running tasks.
PROGRESS_EVERY = 0.5
# Time the soft-timeout hooks of tasks still running at the end of the window get to run.
HOOK_GRACE = 1.0
# Longest wait for Celery to report the pool processes the drain stopped.
STOP_WAIT = 10.0


def _running_ids() -> set[str]:
    from celery.worker import state as worker_state

    return {r.id for r in worker_state.active_requests}


def _running_tasks() -> dict[str, tuple[str, float]]:
    """Task id -> (name, start time) of what the pool runs now."""
    from celery.worker import state as worker_state

    return {
        str(r.id): (str(r.name), float(r.time_start or time.time()))
        for r in list(worker_state.active_requests)
    }


def task_field(task_id: str) -> str:
    """The drain record's field of one task's outcome."""
    return f"task:{task_id}"


class Drain:
    """The drain of one worker process."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime
        self.started = False
        self.finished = threading.Event()
        self._hurry = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._tracked: dict[str, tuple[str, float]] = {}
        self._reported: set[str] = set()

    def begin(self, reason: str, timeout: float | None = None) -> bool:
        """Start draining (from any thread, also a signal handler); a second call hurries a
        drain under way. Return whether this call started it."""
        with self._lock:
            if self.started:
                if self.finished.is_set():
                    return False
                self._hurry.set()
                events.emit(
                    events.DRAIN_HURRIED,
                    f"{reason}: ending the wait, handing off now",
                    worker=self.runtime.worker_id,
                )
                return False
            self.started = True
            self.runtime.inflight.draining = True
        if self.runtime.heartbeat is not None:  # the loop ends: the thread renews
            self.runtime.heartbeat.hand_to_thread()
        window = self.runtime.config.drain_timeout if timeout is None else timeout
        self._thread = threading.Thread(
            target=self._run, args=(reason, window), name="relier-drain", daemon=True
        )
        self._thread.start()
        return True

    def wait(self, timeout: float) -> bool:
        return self.finished.wait(timeout)

    def _progress(self, state: str, **counts: Any) -> None:
        self._write({"state": state, **counts})

    def _write(self, fields: dict[str, Any]) -> None:
        try:
            self.runtime.store.drain_update(self.runtime.worker_id, fields)
        except Exception as exc:  # progress is informative only
            logger.warning("relier: could not record drain progress: %r", exc)

    def _outcomes(self, outcome: str, ids: set[str]) -> dict[str, str]:
        """Fields recording how the tracked running tasks ``ids`` ended (once each)."""
        fields = {}
        now = time.time()
        if ids - set(self._tracked):  # started after the drain began (it refuses new starts)
            self._tracked = {**_running_tasks(), **self._tracked}
        for task_id in sorted(ids - self._reported):
            name, started = self._tracked.get(task_id, ("?", now))
            fields[task_field(task_id)] = json.dumps(
                {"name": name, "outcome": outcome, "seconds": round(max(now - started, 0.0), 3)}
            )
            self._reported.add(task_id)
        return fields

    def _note_ended(self) -> None:
        """Record the tracked running tasks that ended since the last look as completed."""
        ended = set(self._tracked) - _running_ids()
        if ended - self._reported:
            self._write(self._outcomes("completed", ended))

    def _run(self, reason: str, window: float) -> None:
        inflight = self.runtime.inflight
        worker = self.runtime.worker_id
        deadline = time.monotonic() + window
        events.emit(
            events.DRAIN_STARTED,
            f"draining ({reason}); running tasks get {window} s",
            worker=worker,
            timeout=window,
        )
        returned = handed = 0
        self._tracked = _running_tasks()
        try:
            returned = inflight.hand_off(
                exclude=_running_ids(), why="its worker drained before starting it"
            )
            self._progress(
                "draining",
                returned=returned,
                running=len(_running_ids()),
                completed=inflight.drain_completed,
            )
            last = 0.0
            while _running_ids() and time.monotonic() < deadline and not self._hurry.is_set():
                self._note_ended()
                if time.monotonic() - last > PROGRESS_EVERY:
                    last = time.monotonic()
                    self._progress(
                        "draining",
                        returned=returned,
                        running=len(_running_ids()),
                        completed=inflight.drain_completed,
                    )
                time.sleep(0.05)
            still = _running_ids()
            if still:
                self._fire_hooks()
                still = _running_ids()
            self._note_ended()
            if still:
                self._write(self._outcomes("handed_off", still))
            if still and self._prefork():
                # Stop first, hand off after: a task whose body ended meanwhile completes (its
                # record goes), a stopped one is handed off as Celery reports it lost
                # (consumer_hooks), and only what is still recorded then moves below.
                self._stop_tasks(still)
            handed = inflight.hand_off(
                only=still, why="it was still running when its worker's drain window ended"
            )
            handed += inflight.drain_stopped
            # Anything that arrived meanwhile and never started goes too.
            returned += inflight.hand_off(exclude=_running_ids(), why="its worker drained")
        except Exception as exc:
            logger.exception("relier: drain failed; the scanners take over what is left")
            self._progress("failed", error=repr(exc))
            self.finished.set()
            return
        completed = inflight.drain_completed
        line = f"completed {completed}, handed off {handed}, returned {returned}, lost 0"
        events.emit(
            events.DRAIN_FINISHED,
            f"drained: {line}",
            worker=worker,
            completed=completed,
            handed_off=handed,
            returned=returned,
            lost=0,
        )
        self._progress(
            "finished", completed=completed, handed_off=handed, returned=returned, lost=0, running=0
        )
        self.finished.set()
        if handed:
            self._stop_running()

    def _prefork(self) -> bool:
        return self.runtime.prefork

    def _stop_tasks(self, ids: set[str]) -> None:
        """SIGKILL the pool processes running ``ids``; wait (bounded) until Celery has reported
        each of them: finished, or lost (then handed off by relier's on_failure)."""
        kill_pool_tasks(ids)
        deadline = time.monotonic() + STOP_WAIT
        while _running_ids() & ids and time.monotonic() < deadline:
            time.sleep(0.05)

    def _fire_hooks(self) -> None:
        """Let tasks still running save their progress (their soft-timeout hooks) before they
        are handed off: in prefork each pool process is told by SIGUSR2; elsewhere the hooks
        run here."""
        from celery.concurrency.prefork import TaskPool as Prefork

        pool = self.runtime.pool_cls
        if isinstance(pool, type) and issubclass(pool, Prefork):
            from celery.worker import state as worker_state

            for request in list(worker_state.active_requests):
                if request.worker_pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(request.worker_pid, signal.SIGUSR2)
        else:
            fire_drain_hooks()
        # Hooks save progress; give them a moment (bounded) before the hand-off.
        grace = time.monotonic() + HOOK_GRACE
        while _running_ids() and time.monotonic() < grace:
            time.sleep(0.05)

    def _stop_running(self) -> None:
        """The handed-off tasks must not finish here too: stop them."""
        pool = self.runtime.pool_cls
        from celery.concurrency.prefork import TaskPool as Prefork

        if isinstance(pool, type) and issubclass(pool, Prefork):
            from billiard.process import active_children

            for child in active_children():
                if child.pid:
                    os.kill(child.pid, signal.SIGKILL)
            return
        # threads/solo: a running Python thread cannot be stopped; retire and leave.
        self.runtime.stop()
        logging.shutdown()
        os._exit(0)
