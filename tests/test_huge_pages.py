"""wiring/huge_pages.py: which ranges are collapsed, and that the kernel really maps them in
2 MB pages (in a subprocess, so that this process's memory is left as it is)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from relier_celery.wiring import huge_pages
from relier_celery.wiring.huge_pages import HUGE_PAGE, HugeHeap, collapsible, supported

MB2 = HUGE_PAGE

MAPS = f"""\
{0x400000:012x}-{0x600000:012x} r-xp 00000000 08:01 1 /usr/bin/python3.11
{MB2 + 0x1000:012x}-{5 * MB2 + 0x800:012x} rw-p 00000000 00:00 0 [heap]
{8 * MB2:012x}-{8 * MB2 + 0x100000:012x} rw-p 00000000 00:00 0
{10 * MB2 - 0x1000:012x}-{14 * MB2:012x} rw-p 00000000 00:00 0
{16 * MB2:012x}-{20 * MB2:012x} rw-s 00000000 00:01 7 /dev/zero (deleted)
{22 * MB2:012x}-{26 * MB2:012x} rw-p 00000000 08:01 2 /usr/lib/libfoo.so
{28 * MB2:012x}-{30 * MB2:012x} rw-p 00000000 00:00 0 [stack]
{32 * MB2:012x}-{34 * MB2:012x} ---p 00000000 00:00 0
"""


def test_only_private_anonymous_writable_memory_is_collapsed_in_whole_2mb_ranges() -> None:
    # Given the maps of a process: its program, its heap (not 2 MB-aligned), a 1 MB arena,
    # a 4 MB+ anonymous mapping, shared memory, a library's data, its stack, a guard region
    ranges = collapsible(MAPS)
    # Then the heap and the anonymous mapping, each cut to the 2 MB pages it wholly holds;
    # nothing of the files, the shared memory, the stack, the guard, or a mapping under 2 MB
    assert ranges == [(2 * MB2, 5 * MB2), (10 * MB2, 14 * MB2)]


@pytest.mark.timeout(60)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_a_python_heap_ends_up_in_huge_pages() -> None:
    # Given a Python process with about 60 MB of small objects
    probe = textwrap.dedent(
        """
        import os
        from relier_celery.wiring.huge_pages import collapse

        junk = [dict(n=i, s=str(i)) for i in range(250_000)]
        done = collapse()
        with open("/proc/self/smaps_rollup") as f:
            huge = next(int(l.split()[1]) for l in f if l.startswith("AnonHugePages:"))
        print(done, huge)
        """
    )
    # When it collapses its heap
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=50, check=True
    )
    done, huge_kb = (int(x) for x in out.stdout.split())
    if not supported():
        # Then, before Linux 6.1 (no MADV_COLLAPSE) or with huge pages off, nothing, no error
        assert done == 0
        return
    # Then at least 16 MB of it, as the kernel reports, is in 2 MB pages
    assert done >= 16 * 2**20, out
    assert huge_kb >= 16 * 1024, out


def test_the_heartbeat_looks_at_the_pool_at_most_every_recheck_seconds(monkeypatch) -> None:
    # Given a worker's heap, collapsed when it was ready
    heap = HugeHeap()
    looks: list[int] = []
    monkeypatch.setattr(heap, "refresh", lambda: looks.append(1) or 0)
    # When heartbeats come before RECHECK seconds have passed
    heap.tick()
    heap.tick()
    # Then none looks at the pool (a collapse copies tens of MB)
    assert looks == []
    # When RECHECK seconds have passed, Then the next heartbeat looks, and the one after waits
    later = heap._next_look + 0.001
    monkeypatch.setattr(huge_pages.time, "monotonic", lambda: later)
    heap.tick()
    heap.tick()
    assert looks == [1]
