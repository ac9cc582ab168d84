"""Soft and hard timeouts with hooks, in real workers: a timed-out task fails, is never
resurrected, and its record is released."""

from __future__ import annotations

import time

import pytest
from fleet import dlq_entries, done, held_records, send_work, wait_all_done

from relier_celery import TaskContext, install
from relier_celery.testing import wait_for


def _progress(publisher, task_id: str) -> dict:
    install(publisher)
    return TaskContext.load_progress(publisher, task_id)


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_stalled_async_task_gets_its_hook_then_is_cancelled(fleet, publisher, r, pool) -> None:
    w = fleet.start(pool=pool, concurrency=2)
    task_id = publisher.send_task("chaos.stall_async", args=(1,)).id
    # soft (1 s): the async hook saves progress while the task goes on
    wait_for(lambda: _progress(publisher, task_id), 10, what=f"the hook\n{w.log()[-3000:]}")
    assert _progress(publisher, task_id) == {"step": "async-halfway", "n": 1}
    # hard (2.5 s): cancelled, its finally block ran, it failed and was not resurrected
    wait_for(lambda: r.get("test:cleanup:1"), 10, what="the cancelled task's cleanup")
    wait_for(lambda: "HardTimeout" in w.log(), 10, what="the failure")
    wait_for(lambda: held_records(r) == 0, 10, what="the record to be released")
    time.sleep(1)
    assert 1 not in done(r) and int(r.get("test:started:1")) == 1
    log = w.log()
    assert "timeout_type=soft" in log and "timeout_type=hard" in log
    assert "task.resurrected" not in log
    # and it waits in the DLQ (relier_dlq_on_failure), payload and traceback kept
    [entry] = dlq_entries(r)
    assert entry["reason"] == "hard_timeout" and "HardTimeout" in entry["error"]


def test_a_stalled_sync_task_in_prefork_gets_its_hook_then_is_stopped(fleet, publisher, r) -> None:
    w = fleet.start(pool="prefork", concurrency=2)
    task_id = publisher.send_task("chaos.stall_sync", args=(2,)).id
    wait_for(lambda: _progress(publisher, task_id), 10, what=f"the hook\n{w.log()[-3000:]}")
    assert _progress(publisher, task_id) == {"step": "halfway", "n": 2}
    # hard (3 s): Celery's time limit kills the pool process; a failure, not a resurrection
    wait_for(lambda: "TimeLimitExceeded" in w.log(), 15, what="the hard limit")
    wait_for(lambda: held_records(r) == 0, 10, what="the record to be released")
    send_work(publisher, range(10, 13))  # the worker goes on serving
    wait_all_done(r, {10, 11, 12}, 20, fleet)
    log = w.log()
    assert 2 not in done(r) and int(r.get("test:started:2")) == 1
    assert "timeout_type=hard" in log and "task.resurrected" not in log
    [entry] = dlq_entries(r)
    assert entry["reason"] == "hard_timeout" and entry["task_id"] == task_id


def test_a_sync_task_in_the_threads_pool_is_reported_not_stopped(fleet, publisher, r) -> None:
    w = fleet.start(pool="threads", concurrency=2)
    assert "cannot be interrupted in this pool" in w.log()
    task_id = publisher.send_task("chaos.stall_sync", args=(3, 4.0)).id
    wait_all_done(r, {3}, 20, fleet)
    assert _progress(publisher, task_id) == {"step": "halfway", "n": 3}
    log = w.log()
    assert "timeout_type=soft" in log
    assert "passed its hard timeout (3.0 s) but is a sync task" in log
