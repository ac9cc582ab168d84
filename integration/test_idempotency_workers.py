"""Idempotent tasks in real workers: concurrent duplicates produce one side effect."""

from __future__ import annotations

import json

import pytest
from fleet import wait_all_done

from relier_celery.testing import wait_for


@pytest.mark.timeout(120)
def test_concurrent_duplicates_charge_once_and_all_get_the_same_result(fleet, publisher, r):
    # Given two workers with four processes each
    for _ in range(2):
        fleet.start(concurrency=4)
    # When 20 duplicates of one charge are dispatched at once
    for _ in range(20):
        publisher.send_task("chaos.charge", args=(42, 1.0))
    # Then the side effect happened once and every duplicate returned the same result
    wait_for(lambda: r.llen("test:results") == 20, 60, what=f"20 results\n{fleet.logs()}")
    assert int(r.get("test:charged:42")) == 1
    results = {json.dumps(json.loads(x), sort_keys=True) for x in r.lrange("test:results", 0, -1)}
    assert results == {json.dumps({"charge": 1, "order": 42}, sort_keys=True)}
    # (full logs: fleet.logs() keeps only each log's tail)
    assert any("idempotency.hit" in w.log() for w in fleet.workers)


def test_a_dispatch_time_key_makes_different_messages_one_charge(fleet, publisher, r):
    fleet.start(concurrency=2)
    for _ in range(3):
        publisher.send_task("chaos.charge", args=(7, 0.1), headers={"idempotency_key": "pay-7"})
    wait_all_done(r, {7}, 30, fleet)
    wait_for(lambda: r.llen("test:results") == 3, 30, what="3 results")
    assert int(r.get("test:charged:7")) == 1


@pytest.mark.timeout(120)
def test_a_paused_owner_cannot_overwrite_the_result_of_the_worker_that_took_over(
    fleet, publisher, r
) -> None:
    import os
    import signal

    from relier_celery.idempotency import default_key
    from relier_celery.keys import Keys

    # Given a worker running an idempotent task
    paused = fleet.start(concurrency=1)
    publisher.send_task("chaos.fenced", args=(5, 6.0))
    wait_for(lambda: r.get("test:started:5"), 15, what="the task to start")
    other = fleet.start(concurrency=1)
    # When the whole worker is paused past its lease (SIGSTOP), its task resurrected elsewhere
    os.killpg(paused.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: r.llen("test:fenced:5") >= 1, 40, what="the run that took over")
    finally:
        os.killpg(paused.pid, signal.SIGCONT)
    # and then resumes and finishes its own run
    wait_for(lambda: r.llen("test:fenced:5") == 2, 30, what="the paused run to finish")
    first = json.loads(r.lindex("test:fenced:5", 0))
    # Then the stored result is the one of the worker that took over
    key = Keys("rl").idempotency(default_key("chaos.fenced", [5, 6.0], {}))
    assert json.loads(r.hget(key, "result")) == first
    wait_for(lambda: "idempotency.fenced" in paused.log(), 10, what="the fenced-out event")
    assert "idempotency.takeover" in other.log()
