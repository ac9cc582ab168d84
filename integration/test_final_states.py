"""Every final state removes the task's record; retries and ETA tasks are not mistaken for
duplicates, and ETA redeliveries are (G4)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from fleet import FETCH_MODES, done, fetch_env, held_records, wait_all_done

from relier_celery.testing import wait_for


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_failure_retry_expiry_and_success_all_remove_the_record(fleet, publisher, r, pool):
    w = fleet.start(pool=pool, concurrency=2)
    # When a task retries twice (same id, newer messages), one fails, one expired, one succeeds
    publisher.send_task("chaos.flaky", args=(1, 2))
    publisher.send_task("chaos.boom", args=(2,))
    publisher.send_task("chaos.work", args=(3,), expires=datetime.now(UTC) - timedelta(1))
    publisher.send_task("chaos.work", args=(4,))
    # Then the retried task completes (its retries were not dropped as duplicates)
    wait_all_done(r, {1, 4}, 30, fleet)
    wait_for(lambda: r.get("test:boom:2"), 10, what="the failing task to run")
    assert int(r.get("test:flaky:1")) == 3
    assert 3 not in done(r)
    # And no record is left behind
    wait_for(lambda: held_records(r) == 0, 10, what=f"every record removed\n{w.log()[-3000:]}")
    assert "duplicate_dropped" not in w.log()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("reliable", FETCH_MODES)
def test_an_eta_task_redelivered_by_the_visibility_timeout_runs_once(fleet, publisher, r, reliable):
    # Given a 1 s visibility timeout and a task due in 6 s, held unacked by a worker meanwhile
    env = {"RELIER_TEST_VISIBILITY": "1", **fetch_env(reliable)}
    workers = [fleet.start(concurrency=2, **env) for _ in range(2)]
    publisher.send_task("chaos.work", args=(9,), countdown=6)
    # When the broker redelivers it again and again before it is due
    wait_all_done(r, {9}, 30, fleet)
    time.sleep(2)
    # Then it ran once: never redelivered (reliable fetch), or redeliveries dropped (kombu's)
    assert int(r.get("test:runs:9")) == 1
    assert any("task.duplicate_dropped" in w.log() for w in workers) != reliable


@pytest.mark.timeout(90)
@pytest.mark.parametrize("reliable", FETCH_MODES)
def test_reject_with_requeue_gives_the_message_back_and_it_runs_again(
    fleet, publisher, r, reliable
):
    # Given acks_late (Celery gives a rejected message back to the broker only then)
    fleet.start(concurrency=2, RELIER_TEST_ACKS_LATE="1", **fetch_env(reliable))
    # When a task raises Reject(requeue=True) the first time
    publisher.send_task("chaos.reject_once", args=(5,))
    # Then it comes back and runs, and no record is left behind
    wait_all_done(r, {5}, 30, fleet)
    assert int(r.get("test:reject_once:5")) == 2
    wait_for(lambda: held_records(r) == 0, 10, what="every record removed")
