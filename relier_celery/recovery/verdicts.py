"""Verdicts a pool process waits for, in memory shared across the pool's fork.

A broker's redelivery goes to the pool while its receipt is still on its way to Redis
(speculate.py): the pool process, before the task's body, waits until the main process has the
receipt's verdict, to run it or not. Each such request gets a sequence number, stamped on it as
``rl_spec``; its verdict is written to a ring of :data:`RING` entries at ``seq % RING``. An
entry reused by a later number before its pool process read it (more than :data:`RING`
speculations outstanding) reads as "do not run": the process stops, and relier resurrects
what it held; never a guessed "run".
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from multiprocessing.sharedctypes import RawArray
from typing import Any

from relier_celery.core.headers import SPEC_KEY

__all__ = ["RING", "VerdictRing", "attach_ring", "await_verdict", "ring_of"]

logger = logging.getLogger("relier_celery")

RING = 1024
PENDING, RUN, DROP = 0, 1, 2
# A waiting pool process looks again after WAIT_FIRST, doubling up to WAIT_STEP, and after
# WAIT_LONG (Redis slow or down: the receipt is asked again every second) every WAIT_SLOW.
# The verdict usually lands before the process is even scheduled: the first look finds it.
WAIT_FIRST = 0.0001
WAIT_STEP = 0.001
WAIT_LONG = 0.1
WAIT_SLOW = 0.02

RING_ATTR = "relier_verdicts"


class VerdictRing:
    """One worker's speculation verdicts: written by its main process, read by its pool."""

    def __init__(self, size: int = RING) -> None:
        self.size = size
        self._seqs = RawArray("q", size)  # the number each entry is for now (0: none yet)
        self._states = RawArray("b", size)
        self._next = 0
        self._lock = threading.Lock()  # the consumer opens, the receipt thread decides
        self.owner_pid = os.getpid()

    def open(self) -> int:
        """A new sequence number, its verdict pending."""
        with self._lock:
            self._next += 1
            seq = self._next
            i = seq % self.size
            self._states[i] = PENDING
            self._seqs[i] = seq
        return seq

    def decide(self, seq: int, run: bool) -> None:
        with self._lock:
            i = seq % self.size
            if self._seqs[i] == seq:  # else reused already: its reader stops (wait)
                self._states[i] = RUN if run else DROP

    def verdict(self, seq: int) -> bool | None:
        """True: run it; False: do not (or the entry was reused); None: not decided yet."""
        i = seq % self.size
        state = self._states[i]
        if self._seqs[i] != seq:  # reused by a later one (the child has its number only
            return False  # once open() wrote it)
        return None if state == PENDING else state == RUN

    def wait(self, seq: int) -> bool:
        """In the pool process: block until ``seq`` is decided; whether it may run."""
        delay, slow_from = WAIT_FIRST, time.monotonic() + WAIT_LONG
        while (answer := self.verdict(seq)) is None:
            time.sleep(delay)
            delay = WAIT_SLOW if time.monotonic() > slow_from else min(delay * 2, WAIT_STEP)
        return answer


def attach_ring(app: Any, ring: VerdictRing) -> None:
    """Hang a worker's ring on its app, before the pool forks (children inherit it)."""
    setattr(app, RING_ATTR, ring)


def ring_of(app: Any) -> VerdictRing | None:
    ring = getattr(app, RING_ATTR, None)
    return ring if isinstance(ring, VerdictRing) else None


def await_verdict(task: Any) -> None:
    """Before a task's body, in the pool process: a redelivery handed over ahead of its
    receipt (``rl_spec``) starts only on a "run" verdict; on any other the process stops
    itself, and its worker acks the request as a lost one it holds no record of."""
    seq = getattr(task.request, SPEC_KEY, None)
    ring = ring_of(task.app)
    if seq is None or ring is None or ring.wait(int(seq)):
        return
    logger.warning(
        "relier: %s[%s] was handed to this pool process before its receipt, which found it "
        "must not run here (a duplicate, or quarantined): the process stops without running it",
        task.name,
        task.request.id,
    )
    os.kill(os.getpid(), signal.SIGKILL)
