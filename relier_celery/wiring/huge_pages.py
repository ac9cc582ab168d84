"""A worker's main process maps its heap with 2 MB pages, so that it dies faster.

RabbitMQ gives a dead consumer's messages back, and relier takes over a dead holder's tasks,
once the kernel has closed the dead process's sockets. The kernel frees a SIGKILLed process's
memory first (``exit_mm`` before ``exit_files``): for a Celery worker's main process, about
60 MB in 4 KB pages, that took 3-5 ms on the 2-vCPU VM measured, most of the time from a
SIGKILL to the broker noticing; with most of its heap in 2 MB pages, about 2 ms less
(docs/rabbitmq-recovery.md, "A faster death").

Done when the worker is ready, after its pool processes were forked: done before, each of the
main process's writes to a page it shares with them would map that page in 4 KB pieces again.
For the same reason a pool process forked later (``worker_max_tasks_per_child``, a replaced
process) undoes it; :class:`HugeHeap` looks at the pool on the lease's heartbeat, at most every
:data:`RECHECK` seconds, and collapses again when its processes changed. ``MADV_COLLAPSE``
needs Linux 6.1 and transparent huge pages not set to ``never``; elsewhere nothing changes.
The price is memory: the collapsed pages are the main process's own, no longer shared with its
pool processes (about 26 MB a worker, measured). Off with ``relier_huge_pages = False``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import sys
import time

from relier_celery.core.proc import children

__all__ = [
    "HUGE_PAGE",
    "MADV_COLLAPSE",
    "RECHECK",
    "HugeHeap",
    "collapse",
    "collapsible",
    "supported",
]

logger = logging.getLogger("relier_celery")

MADV_COLLAPSE = 25  # linux/mman.h (Linux 6.1)
HUGE_PAGE = 2 * 1024 * 1024  # x86-64's and arm64's (4 KB base pages) PMD size
# Seconds between two looks at the pool's processes (a collapse copies about 35 MB: 25-90 ms).
RECHECK = 30.0


def collapsible(maps: str) -> list[tuple[int, int]]:
    """The 2 MB-aligned ranges of a ``/proc/<pid>/maps`` text that hold the process's private
    anonymous writable memory (its heap, and Python's object arenas): not files, stacks or
    shared memory."""
    ranges = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 5 or fields[1] != "rw-p":
            continue
        if len(fields) == 6 and fields[5].strip() != "[heap]":
            continue
        low, high = (int(x, 16) for x in fields[0].split("-"))
        start = (low + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
        end = high & ~(HUGE_PAGE - 1)
        if end > start:
            ranges.append((start, end))
    return ranges


def supported() -> bool:
    """Whether this kernel can collapse memory into huge pages: Linux 6.1+ (MADV_COLLAPSE),
    transparent huge pages not ``never``."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
        major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    except (OSError, ValueError):
        return False
    return "[never]" not in mode and (major, minor) >= (6, 1)


def collapse() -> int:
    """Map this process's heap with 2 MB pages now; return how many bytes are (0 where the
    kernel cannot). Never raises: a faster death is a gain, not a guarantee."""
    if not supported():
        return 0
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        madvise.restype = ctypes.c_int
        with open("/proc/self/maps") as f:
            ranges = collapsible(f.read())
    except (OSError, AttributeError) as exc:
        logger.debug("relier: no huge pages for the heap: %r", exc)
        return 0
    done = 0
    errors: set[str] = set()
    for start, end in ranges:
        if madvise(start, end - start, MADV_COLLAPSE) == 0:
            done += end - start
        else:
            # EINVAL: a kernel before 6.1, or huge pages off; EAGAIN / ENOMEM: no free 2 MB
            # page now (the next range may still get one).
            errors.add(errno.errorcode.get(ctypes.get_errno(), "?"))
    if errors:
        logger.debug("relier: %d bytes of the heap in huge pages; not all: %s", done, errors)
    return done


class HugeHeap:
    """A worker's heap in 2 MB pages: collapsed when the worker is ready (:meth:`refresh`),
    and again whenever its pool's processes changed since (:meth:`tick`, on the heartbeat)."""

    def __init__(self) -> None:
        self.pool: frozenset[int] | None = None
        self._next_look = time.monotonic() + RECHECK

    def tick(self) -> int:
        """:meth:`refresh`, at most once every :data:`RECHECK` seconds (a worker replacing a
        pool process after every task would otherwise copy its heap every heartbeat)."""
        now = time.monotonic()
        if now < self._next_look:
            return 0
        self._next_look = now + RECHECK
        return self.refresh()

    def refresh(self) -> int:
        """Collapse unless the pool's processes are those of the last collapse; return the
        bytes collapsed now (0 when nothing changed)."""
        pool = frozenset(children(os.getpid()))
        if pool == self.pool:
            return 0
        self.pool = pool
        return collapse()
