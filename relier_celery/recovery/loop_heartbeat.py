"""A prefork worker's heartbeat on its event loop, and a thread only while the loop stands still.

Why: RabbitMQ gives a SIGKILLed worker's messages back once the kernel has closed its sockets,
which the last of its threads to exit does. A second thread, asleep, was measured to make that
slower: SIGKILL to reaped, a worker running 4 tasks, on 2 vCPUs (p50, 30-40 kills each): vanilla
Celery 4.1-4.6 ms, relier with its heartbeat thread 6.6-9.2 ms, relier without it 4.4-6.2 ms;
with the whole worker pinned to one CPU the thread made no difference (3.1 against 3.2 ms), so
the cost is waking the sleeping thread on the other CPU. On this loop: 3.8 ms against vanilla's
3.9 (docs/rabbitmq-recovery.md).

How: the loop renews from a kombu hub timer every quarter of ``heartbeat_interval`` (when a
renewal is due). A loop that stands still (the broker reconnecting, the shutdown waiting for
the pool, a publish the broker holds back) must not cost the worker its lease while its pool
still runs tasks: a SIGALRM watchdog, every quarter interval, starts the heartbeat thread when
the loop has not turned for half an interval, and the thread ends once the loop turns again.
The signal handler takes no lock the code it interrupted may hold: it compares two numbers and
starts the thread with ``_thread.start_new_thread`` (threading's bookkeeping takes locks). It
runs only once the main thread runs Python code, which a system call the kernel restarts
(waiting for a pool process, say) does not let it do: where the loop is known to stop (a
consumer restart, a drain, the shutdown), the thread is started there, and the watchdog is the
net for the rest. The thread also takes over while Redis is unreachable, so that the loop does
not wait out one timeout after another. A SIGALRM handler installed by someone else later
ends this: the thread then runs for good, with a warning, and relier's timer stops (unless they
armed their own since), so that neither their handler nor a default one restored after it (the
process would terminate) gets relier's alarms.
"""

from __future__ import annotations

import _thread
import signal
import threading
import time
from typing import Any

from relier_celery.core import events
from relier_celery.recovery.lease import Lease

__all__ = ["LoopHeartbeat"]


class LoopHeartbeat:
    """Drives ``lease`` from ``hub`` (a prefork worker's event loop, in its main thread)."""

    def __init__(self, lease: Lease, hub: Any) -> None:
        self.lease = lease
        self.hub = hub
        self.step = lease.config.heartbeat_interval / 4
        self.stall = 2 * self.step
        self._turned = time.monotonic()
        self._entry: Any = None
        self._previous: Any = None
        self._on = False
        self._handler = self._on_alarm  # one bound method, to recognise it installed

    def start(self) -> None:
        """Take over from the thread (it ends at its next wake, the loop turning)."""
        self._turned = time.monotonic()
        self.lease.loop_turning = self.turning
        self._entry = self.hub.call_repeatedly(self.step, self._on_loop)
        self._previous = signal.signal(signal.SIGALRM, self._handler)
        signal.siginterrupt(signal.SIGALRM, False)  # C code's system calls go on
        signal.setitimer(signal.ITIMER_REAL, self.step, self.step)
        self._on = True

    def rearm(self) -> None:
        """Register the loop's timer again (Celery 5.6 clears every hub timer when the
        consumer restarts; 5.7 keeps them)."""
        if self._entry is not None:
            self._entry.cancel()
            self._entry = self.hub.call_repeatedly(self.step, self._on_loop)

    def stop(self) -> None:
        """Hand the heartbeat back to the thread (the worker stops: the loop is done), and
        SIGALRM to the handler before (from the main thread, the only one that may)."""
        self.hand_to_thread(alarm_off=self._on)
        if self._entry is not None:
            self._entry.cancel()
            self._entry = None
        main = threading.current_thread() is threading.main_thread()
        if main and signal.getsignal(signal.SIGALRM) is self._handler:
            signal.signal(signal.SIGALRM, self._previous or signal.SIG_DFL)

    def loop_stopped(self) -> None:
        """The consumer restarts (its loop waits for the broker): the thread renews until the
        loop turns again. The watchdog would start it too, but only once the main thread runs
        Python code: a system call the kernel restarts does not let it."""
        if self._on:
            # Not turning from now on: a thread that the loop's last turn told to end stays
            # (the start below would find it still there and do nothing).
            self._turned = float("-inf")
            self.lease.start_thread()

    def hand_to_thread(self, alarm_off: bool = True) -> None:
        """From any thread: the thread renews from now on (a drain: the loop is ending, and
        the shutdown waits for the pool in system calls the watchdog cannot interrupt).
        ``alarm_off``: stop the watchdog's timer too (not when another handler owns it)."""
        was_on, self._on = self._on, False
        if was_on and alarm_off:
            signal.setitimer(signal.ITIMER_REAL, 0)  # any thread may; an alarm left to a
            # default handler restored later would kill the process
        self.lease.loop_turning = None
        self.lease.start_thread()

    def _timer_is_ours(self) -> bool:
        """Whether the process's ITIMER_REAL still repeats at this watchdog's step (another
        owner of SIGALRM that armed a timer of its own replaced ours: setitimer keeps one)."""
        _remaining, interval = signal.getitimer(signal.ITIMER_REAL)
        return abs(interval - self.step) < 1e-4

    def turning(self) -> bool:
        return self._on and time.monotonic() - self._turned < self.stall

    def _on_loop(self) -> None:
        if not self._on:
            return
        self._turned = time.monotonic()
        if signal.getsignal(signal.SIGALRM) is not self._handler:
            events.emit(
                events.CONFIG_WARNING,
                "another SIGALRM handler replaced relier's loop watchdog: the lease "
                "heartbeat runs in a thread of the main process from now on",
                worker=self.lease.worker,
            )
            # Their handler would get relier's alarm every step for good, and the handler
            # restored after theirs (the default: terminate) would get it next: relier's timer
            # goes, unless they armed one of their own since.
            self.hand_to_thread(alarm_off=self._timer_is_ours())
            return
        if self.lease.thread_running:
            if self.lease.down:
                return  # it retries; the loop does not wait on timeouts
            # It ends now, and the loop renews at once if a renewal is due: after a thaw, this
            # first turn fences the worker before it reads what the freeze left unread (kombu's
            # hub fires its timers before it polls).
            self.lease.end_thread()
        elif self.lease.down:
            self.lease.start_thread()  # it retries; the loop does not wait on timeouts
            return
        self.lease.beat_if_due(wait=False)
        if self.lease.down:
            self.lease.start_thread()

    def _on_alarm(self, signum: int, frame: Any) -> None:
        if self._on and not self.turning() and not self.lease.thread_running:
            self.lease.start_thread(_thread.start_new_thread)
