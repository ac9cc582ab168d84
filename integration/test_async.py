"""Async tasks in real workers: one persistent loop per worker process, under every pool."""

from __future__ import annotations

import pytest
from fleet import done, held_records, wait_all_done

from relier_celery.testing import wait_for


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_an_async_task_awaiting_real_io_completes(fleet, publisher, r, pool) -> None:
    fleet.start(pool=pool, concurrency=2)
    ids = {n: publisher.send_task("chaos.async_io", args=(n,)).id for n in range(10)}
    wait_all_done(r, set(range(10)), 30, fleet)
    # each task saw its own TaskContext
    assert {n: r.get(f"test:ctx:{n}") for n in range(10)} == ids
    # one loop per worker process (prefork: per pool child), reused by every task
    loops = r.smembers("test:loops")
    pids = {entry.split(":")[0] for entry in loops}
    assert len(loops) == len(pids) <= 2
    wait_for(lambda: held_records(r) == 0, 10, what="records removed")


@pytest.mark.timeout(120)
def test_200_concurrent_async_tasks_share_one_loop_in_one_process(fleet, publisher, r) -> None:
    # Given one worker process with 200 threads
    fleet.start(pool="threads", concurrency=200, RELIER_TEST_PREFETCH="1")
    # When 200 async tasks that each wait 1 s arrive at once
    for n in range(200):
        publisher.send_task("chaos.async_io", args=(n, 1.0))
    wait_all_done(r, set(range(200)), 60, fleet)
    # Then all complete, on a single loop, many of them at the same time
    assert len(r.smembers("test:loops")) == 1
    assert int(r.get("test:max_running")) >= 50
    assert done(r) == set(range(200))
