"""A worker's lease: the proof, renewed every ``heartbeat_interval``, that it is alive.

The heartbeat runs in a dedicated thread of the worker's main process, so task code cannot
starve it: prefork tasks run in other processes, and a threads or solo pool task would have to
hold the GIL for seconds without releasing it. A prefork worker's main process renews from its
event loop instead, and starts that thread only while the loop stands still
(loop_heartbeat.py). When a renewal finds the lease had already run
out, the worker was taken for dead and its tasks may be running elsewhere: that is reported
loudly as ``lease.lost``, and the worker gives up everything it held before it acts again.

:class:`LeaseClock` is the local side of the lease, shared with the pool processes: the
monotonic deadline by which the last renewal lets this worker act, and an epoch that rises each
time the lease was lost. A task checks both before it starts, in the process that runs it,
without a Redis round trip (see :func:`gate`).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.sharedctypes import RawArray
from typing import Any

from relier_celery.core import events
from relier_celery.core.config import RelierConfig
from relier_celery.core.errors import StoreUnavailable
from relier_celery.store.client import Store
from relier_celery.store.presence import Presence

__all__ = ["Lease", "LeaseClock", "clock_of", "gate"]

# How long before the lease's deadline (by the last renewal's send time) the worker stops
# starting tasks: the Redis server computes the deadline from its own clock a little later,
# and a scanner acts only once it passed, so the worker always stops first.
MARGIN = 0.5
# How often a task waiting for a renewal looks again.
GATE_POLL = 0.02

# The attribute of a Celery app that holds its worker's clock (the pool processes inherit it).
CLOCK_ATTR = "relier_clock"


class LeaseClock:
    """The lease as this worker's processes see it, in memory shared across the pool's fork:
    ``deadline`` (``time.monotonic()`` seconds, system-wide on Linux) and ``epoch``."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.margin = min(MARGIN, ttl / 4)
        self._shared = RawArray("d", 2)  # [deadline, epoch]
        self.owner_pid = os.getpid()

    @property
    def deadline(self) -> float:
        return float(self._shared[0])

    @property
    def epoch(self) -> int:
        return int(self._shared[1])

    def renewed(self, sent_at: float) -> None:
        """A renewal sent at ``sent_at`` (monotonic) succeeded."""
        self._shared[0] = sent_at + self.ttl - self.margin

    def lost(self) -> int:
        """The lease was lost: what was received before now is no longer this worker's."""
        self._shared[1] = self.epoch + 1
        return self.epoch

    def live(self) -> bool:
        return time.monotonic() < self.deadline

    def wait_live(self) -> float:
        """Block until the lease is live again; return how long that took (s)."""
        start = time.monotonic()
        while not self.live():
            time.sleep(GATE_POLL)
        return time.monotonic() - start


def attach_clock(app: Any, clock: LeaseClock) -> None:
    """Hang a worker's clock on its app, before the pool forks (children inherit it)."""
    setattr(app, CLOCK_ATTR, clock)


def clock_of(app: Any) -> LeaseClock | None:
    """The worker's clock hung on ``app``, or None (no worker in this process, or no app)."""
    clock = getattr(app, CLOCK_ATTR, None)
    return clock if isinstance(clock, LeaseClock) else None


def gate(task: Any) -> None:
    """Before a task's body, in the process that runs it: start only under a live lease, and
    only a delivery received under the current one (``rl_epoch``, stamped by the worker as it
    hands the request to the pool). Past the deadline it waits for the next renewal; a
    delivery given up when the lease was lost does not run: a pool process stops itself
    (Celery reports it lost, and relier, which gave it up already, lets it go)."""
    clock = clock_of(task.app)
    epoch = getattr(task.request, "rl_epoch", None)
    if clock is None or epoch is None:
        return
    if not clock.live():
        waited = clock.wait_live()
        events.emit(
            events.LEASE_WAITED,
            f"{task.name}[{task.request.id}] waited {waited:.2f} s for this worker's lease "
            "to be renewed before starting",
            task_id=task.request.id,
            task_name=task.name,
        )
    if int(epoch) == clock.epoch:
        return
    events.emit(
        events.TASK_FENCED,
        f"{task.name}[{task.request.id}] was given up when this worker lost its lease: not "
        "started here (it runs where it was resurrected)",
        task_id=task.request.id,
        task_name=task.name,
    )
    if os.getpid() != clock.owner_pid:
        os.kill(os.getpid(), signal.SIGKILL)
    # threads/solo: the worker already refused it before the pool (consumer_hooks); a task
    # that got this far cannot be stopped from here and runs: reported above.


class Lease:
    """Keeps one worker's lease alive: from a background thread, or from a prefork worker's
    event loop with a thread only while the loop stands still (loop_heartbeat.py)."""

    def __init__(
        self,
        config: RelierConfig,
        store: Store,
        worker: str,
        on_renewed: Callable[[], None] | None = None,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.worker = worker
        self.on_renewed = on_renewed
        self.on_lost = on_lost
        self.clock = LeaseClock(config.lease_ttl)
        self._stop = threading.Event()
        self._wake = threading.Event()  # ends the thread's wait early (stop, or the loop turns)
        self._beating = threading.Lock()  # one renewal at a time (the loop's or the thread's)
        self._last_sent = 0.0
        self._threads = 0  # heartbeat threads running (0 or 1)
        # Starting the thread and its deciding to end are one step each: a start asked for
        # just as the thread decides to end either sees it gone or makes it stay.
        self._state = threading.Lock()
        # While set (loop_heartbeat.py), the thread ends once this says the loop turns again.
        self.loop_turning: Callable[[], bool] | None = None
        self._down = False
        self._renewed = False
        self.presence = Presence(store, worker)

    @property
    def down(self) -> bool:
        """Whether the last renewal failed (Redis unreachable)."""
        return self._down

    @property
    def thread_running(self) -> bool:
        return self._threads > 0

    def acquire(self) -> None:
        """Take the lease now (raises StoreUnavailable) and start renewing it."""
        sent = time.monotonic()
        self.store.renew_lease(self.worker, self.config.lease_ttl)
        self.clock.renewed(sent)
        self._last_sent = sent
        self.presence.open()
        self.start_thread()

    def start_thread(self, start: Callable[..., Any] | None = None) -> None:
        """Renew from a thread until stopped, or until the loop turns again. ``start``: how to
        start it (loop_heartbeat.py's signal handler passes ``_thread.start_new_thread``,
        which takes none of threading's locks)."""
        if not self._state.acquire(blocking=start is None):
            return  # the signal handler waits on no lock (the code it interrupted may hold it)
        try:
            if self._threads or self._stop.is_set():
                return
            self._threads = 1
        finally:
            self._state.release()
        if start is not None:
            start(self._loop, ())
            return
        threading.Thread(target=self._loop, name="relier-heartbeat", daemon=True).start()

    def release(self) -> int:
        """Stop renewing; forget the lease, or expire it now if records are left (they are
        then resurrected by the next scan). Return how many records were left."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + 5
        while self._threads and time.monotonic() < deadline:
            time.sleep(0.01)
        self.presence.close()
        return self.store.retire(self.worker)

    def beat_if_due(self, wait: bool = True) -> None:
        """Renew if ``heartbeat_interval`` has passed since the last renewal was sent (the
        loop and a thread may both ask); ``wait=False``: not if a renewal is under way."""
        if not self._beating.acquire(blocking=wait):
            return
        try:
            if time.monotonic() - self._last_sent >= 0.9 * self.config.heartbeat_interval:
                self._beat()
        finally:
            self._beating.release()

    def renew(self) -> None:
        """Renew; when the lease had been lost, give up what was held (``on_lost``) before the
        clock lets anything start again."""
        sent = self._last_sent = time.monotonic()
        prev, now = self.store.renew_lease(self.worker, self.config.lease_ttl)
        # A lease that ran out, or that a scanner already forgot (it held nothing left to
        # resurrect), both mean this worker was taken for dead.
        gone = prev == -1 and self._renewed
        taken = prev == -2
        lost = gone or taken or 0 <= prev < now
        if lost:
            ago = "some time" if gone else f"{(now - prev) / 1000:.1f} s"
            why = (
                "the broker redelivered tasks of this worker while it looked gone (its "
                "presence connection to Redis was closed), and another worker took them over"
                if taken
                else f"this worker's lease ran out {ago} ago (paused or cut off from Redis?): "
                "it was taken for dead and its tasks may have been resurrected elsewhere. "
                "Raise relier_lease_ttl if pauses are expected"
            )
            events.emit(
                events.LEASE_LOST,
                why,
                worker=self.worker,
            )
            if self.on_lost is not None:
                self.on_lost()  # raises the clock's epoch as it gives up what was held
            else:
                self.clock.lost()
        self.clock.renewed(sent)
        self._renewed = True

    def end_thread(self) -> None:
        """The loop turns again: the thread ends now, not at its next renewal."""
        self._wake.set()

    def _loop(self) -> None:
        try:
            while True:
                self._wake.wait(self.config.heartbeat_interval)
                self._wake.clear()
                with self._state:
                    turning = self.loop_turning
                    if self._stop.is_set() or (
                        turning is not None and turning() and not self._down
                    ):
                        self._threads = 0  # stopped, or the event loop renews again
                        return
                self.beat_if_due()
        except BaseException:
            with self._state:
                self._threads = 0
            raise

    def _beat(self) -> None:
        try:
            self.renew()
            self.presence.touch()
            if self.on_renewed is not None:
                self.on_renewed()
            if self._down:
                self._down = False
                events.emit(
                    events.STORE_RECOVERED, "heartbeat reaches Redis again", worker=self.worker
                )
        except StoreUnavailable as exc:
            if not self._down:
                self._down = True
                events.emit(
                    events.STORE_UNAVAILABLE, f"heartbeat failed: {exc}", worker=self.worker
                )
        except Exception as exc:
            events.emit(events.STORE_UNAVAILABLE, f"heartbeat failed: {exc!r}", worker=self.worker)
