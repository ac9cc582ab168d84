"""G1/G2/G5: real workers SIGKILLed; every task completes or lands in the DLQ."""

from __future__ import annotations

import base64
import json
import random
import signal
import time

import pytest
from fleet import (
    BROKERS,
    FETCH_MODES,
    dlq_entries,
    done,
    fetch_env,
    held_records,
    relier_cli,
    send_work,
    wait_all_done,
    wait_chaos_done,
)

from relier_celery.testing import wait_for

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_a_sigkilled_workers_tasks_run_again_on_a_live_worker(fleet, publisher, r, pool) -> None:
    # Given two workers, the first of which takes every task
    victim = fleet.start(pool=pool, concurrency=2)
    send_work(publisher, range(6), seconds=3.0)
    wait_for(lambda: r.get("test:started:0"), 10, what="a task to start")
    survivor = fleet.start(pool=pool, concurrency=2)
    # When the first worker is SIGKILLed mid-task (main process and its pool)
    victim.kill(signal.SIGKILL)
    killed_at = time.monotonic()
    # Then every task completes on the survivor
    wait_all_done(r, set(range(6)), 40, fleet)
    assert time.monotonic() - killed_at < 30
    assert "task.resurrected" in survivor.log()
    wait_for(lambda: held_records(r) == 0, 10, what="records to be removed")


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("pool", "broker"),
    [("prefork", "redis"), ("threads", "redis"), ("prefork", "rabbitmq")],
    indirect=["broker"],
)
def test_chaos_main_process_kills_lose_nothing(fleet, publisher, r, pool) -> None:
    # Given two workers and 300 tasks of random duration
    rng = random.Random(1234)
    for _ in range(2):
        fleet.start(pool=pool, concurrency=3)
    expected = set(range(300))
    ids = dict(enumerate(send_work(publisher, range(300), seconds=lambda n: rng.uniform(0.0, 0.3))))
    # When workers are SIGKILLed (main process) repeatedly and replaced
    kills = 0
    deadline = time.monotonic() + 60
    while kills < 4 and time.monotonic() < deadline and done(r) != expected:
        time.sleep(rng.uniform(1.0, 2.0))
        fleet.kill_random(rng)
        kills += 1
        fleet.start(pool=pool, concurrency=3)
    # Then every task id completes (but one that kombu lost before any worker saw it)
    wait_chaos_done(r, ids, 90, fleet)
    assert kills >= 2, "the run ended before the chaos: make it longer"
    wait_for(lambda: held_records(r) == 0, 20, what="every record to be removed")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("broker", BROKERS, indirect=True)
def test_chaos_pool_child_kills_lose_nothing(fleet, publisher, r) -> None:
    # Given two prefork workers and 200 tasks
    rng = random.Random(99)
    workers = [fleet.start(concurrency=3) for _ in range(2)]
    expected = set(range(200))
    send_work(publisher, range(200), seconds=lambda n: rng.uniform(0.05, 0.3))
    # When pool children are SIGKILLed repeatedly (the main process lives: WorkerLostError)
    kills = 0
    deadline = time.monotonic() + 40
    while kills < 8 and time.monotonic() < deadline and done(r) != expected:
        time.sleep(rng.uniform(0.3, 0.8))
        children = [pid for w in workers for pid in w.children()]
        if children:
            try:
                import os

                os.kill(rng.choice(children), signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass
    # Then every task completes, resurrected at once by the main process
    wait_all_done(r, expected, 90, fleet)
    assert kills >= 3
    assert any("its pool process died (WorkerLostError)" in w.log() for w in workers)
    wait_for(lambda: held_records(r) == 0, 20, what="every record to be removed")


@pytest.mark.parametrize("broker", BROKERS, indirect=True)
def test_a_killed_pool_child_is_resurrected_at_once_not_failed(fleet, publisher, r) -> None:
    worker = fleet.start(concurrency=2)
    publisher.send_task("chaos.kill_child", args=(7,))
    wait_for(lambda: 7 in done(r), 20, what="the task to run again after its child died")
    assert "its pool process died (WorkerLostError)" in worker.log()
    assert int(r.get("test:kill_child:7")) == 2


@pytest.mark.timeout(180)
@pytest.mark.parametrize("broker", BROKERS, indirect=True)
def test_a_poison_pill_ends_in_the_dlq_and_the_fleet_keeps_serving(fleet, publisher, r) -> None:
    # Given a task that kills whichever worker runs it (max_resurrections=2)
    fleet.start(concurrency=1)
    fleet.start(concurrency=1)
    poison_id = publisher.send_task("chaos.poison", args=("p1",)).id
    # When workers keep dying, and are replaced
    deadline = time.monotonic() + 120
    while not dlq_entries(r) and time.monotonic() < deadline:
        while len(fleet.alive()) < 2:
            fleet.start(concurrency=1)
        time.sleep(0.2)
    # Then it is quarantined after 1 + 2 runs, with its payload intact
    entries = dlq_entries(r)
    assert len(entries) == 1, fleet.logs()
    entry = entries[0]
    assert entry["task_id"] == poison_id and entry["reason"] == "max_resurrections"
    assert entry["resurrections"] == 2 and entry["crashes"] == 2 and entry["worker"]
    body = json.loads(base64.b64decode(entry["message"]["body"]))
    assert body[0] == ["p1"]
    assert int(r.get("test:poison:p1")) == 3
    # And the fleet still serves other tasks
    while len(fleet.alive()) < 1:
        fleet.start(concurrency=1)
    send_work(publisher, range(5))
    wait_all_done(r, set(range(5)), 30, fleet)
    # And once the bug is fixed, a release through the CLI runs it to completion
    r.set("test:fixed:p1", 1)
    out = relier_cli(fleet, "dlq", "release", entry["id"][:8])
    assert out.returncode == 0, out.stderr
    wait_for(lambda: "p1" in r.smembers("test:done"), 30, what="the released task")
    assert not dlq_entries(r)


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_cpu_bound_task_code_cannot_starve_the_heartbeat(fleet, publisher, r, pool) -> None:
    # Given a 3 s lease, and a second worker whose scanner would resurrect a "dead" one
    busy = fleet.start(pool=pool, concurrency=1)
    publisher.send_task("chaos.spin", args=(1, 7.0))
    wait_for(lambda: r.get("test:started:1"), 10, what="the task to start")
    other = fleet.start(pool=pool, concurrency=1)
    # When the task burns CPU in pure Python for more than twice the lease
    wait_for(lambda: 1 in done(r), 30, what="the task to finish")
    # Then the heartbeat kept the lease alive: nothing was resurrected, it ran once
    assert int(r.get("test:started:1")) == 1
    assert "task.resurrected" not in other.log() + busy.log()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("reliable", FETCH_MODES)
def test_late_broker_redelivery_of_a_resurrected_task_is_dropped(
    fleet, publisher, r, reliable
) -> None:
    # Given acks_late and a 2 s visibility timeout: the broker redelivers a dead worker's
    # unacked messages by itself (kombu's fetch), while relier resurrects them too
    env = {"RELIER_TEST_ACKS_LATE": "1", "RELIER_TEST_VISIBILITY": "2", "RELIER_TEST_PREFETCH": "1"}
    env.update(fetch_env(reliable))
    victim = fleet.start(concurrency=2, **env)
    send_work(publisher, range(2), seconds=2.5)
    wait_for(lambda: all(r.get(f"test:started:{n}") for n in range(2)), 10, what="tasks to start")
    # When the worker running them is SIGKILLed (before another worker starts: a start can
    # outlast the tasks on a loaded machine), and another worker starts
    victim.kill(signal.SIGKILL)
    survivor = fleet.start(concurrency=2, **env)
    wait_all_done(r, {0, 1}, 40, fleet)
    time.sleep(4)  # time for any further copy to arrive and run
    # Then each ran once on the dead worker and once after: never a third time
    assert [int(r.get(f"test:started:{n}")) for n in range(2)] == [2, 2], survivor.log()
    assert [int(r.get(f"test:runs:{n}")) for n in range(2)] == [1, 1]
    # (kombu's fetch: the broker's late copy is dropped as a duplicate, or, when it arrives
    # first, taken over from the dead holder and the scanner then finds nothing to resurrect)
    log = survivor.log()
    if reliable:
        assert "task.duplicate_dropped" not in log
    else:
        assert "task.duplicate_dropped" in log or "task.taken_over" in log, log


@pytest.mark.timeout(120)
@pytest.mark.parametrize("broker", BROKERS, indirect=True)
def test_sigterm_finishes_running_tasks_and_hands_back_prefetched_ones(fleet, publisher, r):
    # Given a worker that has started two tasks and prefetched more
    leaving = fleet.start(concurrency=2)
    send_work(publisher, range(10), seconds=1.5)
    wait_for(lambda: r.get("test:started:0") and r.get("test:started:1"), 10, what="a start")
    staying = fleet.start(concurrency=2)
    # When it gets SIGTERM (Celery's warm shutdown)
    assert leaving.stop(timeout=30) == 0
    # Then every task completes, and none runs twice
    wait_all_done(r, set(range(10)), 60, fleet)
    time.sleep(2)
    assert [int(r.get(f"test:runs:{n}")) for n in range(10)] == [1] * 10, staying.log()
    assert "task(s) handed off" in leaving.log()
    wait_for(lambda: held_records(r) == 0, 10, what="every record to be removed")
