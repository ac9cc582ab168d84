"""The reliable fetch under real kills: no message is ever only in a socket buffer, and a
resurrected task goes back to the head of its queue."""

from __future__ import annotations

import random
import signal
import time

import pytest
from celery import Celery
from fleet import done, held_records, leftovers, wait_chaos_done

from relier_celery import install
from relier_celery.core.keys import Keys
from relier_celery.core.record import TaskRecord
from relier_celery.recovery.resurrect import Resurrector
from relier_celery.testing import wait_for

pytestmark = pytest.mark.integration

# Bounds of the busy-fleet chaos run: enough short tasks that every kill lands mid-stream.
CHAOS_TASKS = 8000
CHAOS_KILLS = 12


@pytest.mark.timeout(300)
def test_thousands_of_short_tasks_survive_a_sigkill_every_second(fleet, publisher, r) -> None:
    # Given two prefork workers draining thousands of short tasks (0-5 ms)
    rng = random.Random(7)
    for _ in range(2):
        fleet.start(concurrency=2, RELIER_TEST_PREFETCH="4")
    ids = {}
    with publisher.producer_or_acquire() as producer:
        for n in range(CHAOS_TASKS):
            secs = rng.uniform(0.0, 0.005)
            ids[n] = publisher.send_task("chaos.work", args=(n, secs), producer=producer).id
    # When a whole worker is SIGKILLed every second under load, and replaced at once
    kills = 0
    mid_stream = 0
    deadline = time.monotonic() + 90
    while kills < CHAOS_KILLS and time.monotonic() < deadline and len(done(r)) < CHAOS_TASKS:
        time.sleep(1.0)
        alive = fleet.alive()
        if len(alive) < 2:
            fleet.start(concurrency=2, wait=False, RELIER_TEST_PREFETCH="4")
            continue
        before = len(done(r))
        rng.choice(alive).kill(signal.SIGKILL)
        kills += 1
        mid_stream += 0 < before < CHAOS_TASKS
        fleet.start(concurrency=2, wait=False, RELIER_TEST_PREFETCH="4")
    # Then every task id completes: none is lost, with or without a trace
    wait_chaos_done(r, ids, 120, fleet)
    assert kills >= 5 and mid_stream >= 5, "the run ended before the chaos: make it longer"
    # And nothing is left in any queue, held record or kombu unacked entry
    wait_for(lambda: leftovers(r) == {"queued": 0, "held": 0, "unacked": 0}, 30, what="leftovers")
    twice = sum(int(r.get(f"test:runs:{n}") or 0) > 1 for n in range(CHAOS_TASKS))
    print(f"\n{kills} kills, {CHAOS_TASKS} tasks, 0 lost, {twice} ran twice")


@pytest.mark.timeout(180)
def test_a_resurrected_task_starts_before_the_tasks_queued_after_it(
    fleet, publisher, r, redis_url
) -> None:
    # Given one worker running a long task, with a backlog far deeper than the fleet
    victim = fleet.start(concurrency=1, RELIER_TEST_PREFETCH="1")
    ids = {0: publisher.send_task("chaos.work", args=(0, 5.0)).id}
    wait_for(lambda: r.get("test:started:0"), 15, what="the first task to start")
    backlog = list(range(1, 41))
    for n in backlog:
        ids[n] = publisher.send_task("chaos.work", args=(n, 0.05)).id
    time.sleep(0.5)
    # When the worker is SIGKILLed and its lease runs out (then a scan resurrects its tasks)
    held = {
        TaskRecord.loads(raw, field).task_id: field
        for key in r.scan_iter(Keys("rl").held("*"))
        for field, raw in r.hgetall(key).items()
    }
    resurrected = {n for n, task_id in ids.items() if task_id in held}
    assert 0 in resurrected
    victim.kill(signal.SIGKILL)
    starts_before = r.llen("test:order")
    scanner_app = Celery("scanner", broker=redis_url)
    relier = install(scanner_app)
    scanner = Resurrector(scanner_app, relier.config, relier.store)
    wait_for(lambda: scanner.scan_once() > 0, 20, interval=0.5, what="the lease to expire")
    assert held_records(r) == 0
    # And a new worker starts on the queue
    fleet.start(concurrency=1, RELIER_TEST_PREFETCH="1")
    wait_for(lambda: done(r) >= {0, *backlog}, 60, what="every task to complete")
    # Then the resurrected tasks ran first, before anything that was queued behind them
    order = [int(x) for x in r.lrange("test:order", starts_before, -1)]
    assert set(order[: len(resurrected)]) == resurrected, order
    scanner_app.close()
