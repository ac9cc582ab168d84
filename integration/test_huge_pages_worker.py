"""A ready relier worker's main process has its heap in 2 MB pages (wiring/huge_pages.py), so
that a SIGKILL frees it faster and the broker sees its sockets close sooner; off with
``relier_huge_pages = False``. The speed is measured by benchmarks/bench_rabbitmq.py, not here."""

from __future__ import annotations

import json

import pytest
from fleet import done, send_work

from relier_celery.testing import wait_for
from relier_celery.wiring.huge_pages import supported

LINE = "of this worker's heap in 2 MB pages"


def madvise_only() -> bool:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        return "[madvise]" in f.read()


def anon_huge_kb(pid: int) -> int:
    """The process's anonymous memory mapped in huge pages (a split mapping does not count)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return 0


@pytest.mark.timeout(90)
@pytest.mark.skipif(not supported(), reason="needs Linux 6.1+ and huge pages on")
def test_a_ready_worker_keeps_its_heap_in_huge_pages_while_it_works(fleet, publisher, r) -> None:
    # Given a relier worker with two pool processes, ready
    w = fleet.start(concurrency=2)
    wait_for(lambda: LINE in w.log(), 30, what="the huge pages log line")
    # When it has run tasks (its main process writing all over its heap)
    send_work(publisher, range(20))
    wait_for(lambda: len(done(r)) == 20, 30, what="20 tasks")
    # Then at least 8 MB of its main process's heap is still mapped in 2 MB pages: collapsed
    # after the pool processes were forked (before, its first writes would have split them)
    assert anon_huge_kb(w.pid) >= 8 * 1024, w.log()[-2000:]


@pytest.mark.timeout(90)
def test_relier_huge_pages_false_leaves_the_heap_alone(fleet) -> None:
    # Given relier_huge_pages = False
    w = fleet.start(RELIER_TEST_CONF=json.dumps({"relier_huge_pages": False}))
    # When the worker is ready (Celery logs "ready." after the worker_ready signal)
    # Then it left its heap as it was
    assert "ready." in w.log()
    assert LINE not in w.log()
    if supported() and madvise_only():  # the kernel makes none on its own
        assert anon_huge_kb(w.pid) == 0


@pytest.mark.timeout(120)
@pytest.mark.skipif(not supported(), reason="needs Linux 6.1+ and huge pages on")
def test_the_heap_is_collapsed_again_after_pool_processes_were_replaced(
    fleet, publisher, r
) -> None:
    # Given a worker whose pool processes each run one task and are replaced, looking at its
    # pool every second (30 s in production)
    w = fleet.start(
        concurrency=2,
        RELIER_TEST_CONF=json.dumps({"worker_max_tasks_per_child": 1}),
        RELIER_TEST_HUGE_RECHECK="1",
    )
    first = set(w.children())
    # When its pool processes were all replaced (each new one shares the main process's heap,
    # whose next writes map it in 4 KB pieces again)
    send_work(publisher, range(6))
    wait_for(lambda: len(done(r)) == 6, 30, what="6 tasks")
    wait_for(lambda: not (set(w.children()) & first), 30, what="the pool processes replaced")
    # Then the main process maps its heap in 2 MB pages again within a few seconds
    wait_for(lambda: anon_huge_kb(w.pid) >= 8 * 1024, 15, what="the heap collapsed again")
