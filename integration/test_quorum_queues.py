"""Issue 17: relier on RabbitMQ with ``task_acks_late``, on a classic and on a quorum queue
(Celery's ``worker_detect_quorum_queues``: per-consumer QoS, native delayed delivery). A
SIGKILLed worker's tasks run again at once (test_rabbitmq.py times the takeover on both queue
types; here a chaos run); a poison pill reaches relier's DLQ after max_resurrections whether
RabbitMQ redelivers it (a takeover) or relier's scanner republishes it; RabbitMQ's own
``x-delivery-limit`` dropping a message does not lose it."""

from __future__ import annotations

import json
import random
import time

import pytest
from fleet import dlq_entries, done, held_records, send_work, wait_all_done, wait_chaos_done

from relier_celery.testing import wait_for

pytestmark = pytest.mark.integration

ACKS_LATE = {"RELIER_TEST_ACKS_LATE": "1"}


def _poison_until_quarantined(fleet, publisher, r, tag: str, timeout: float) -> dict:
    """Publish a task that kills whichever worker runs it, keep two workers up until it is
    in relier's DLQ, and return that entry."""
    fleet.start(concurrency=1, **ACKS_LATE)
    fleet.start(concurrency=1, **ACKS_LATE)
    task_id = publisher.send_task("chaos.poison", args=(tag,)).id
    deadline = time.monotonic() + timeout
    while not dlq_entries(r) and time.monotonic() < deadline:
        while len(fleet.alive()) < 2:
            fleet.start(concurrency=1, **ACKS_LATE)
        time.sleep(0.2)
    entries = dlq_entries(r)
    assert len(entries) == 1, f"{r.get(f'test:poison:{tag}')} runs\n{fleet.logs()}"
    assert entries[0]["task_id"] == task_id
    return entries[0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("broker", ["rabbitmq", "rabbitmq-quorum"], indirect=True)
def test_a_poison_pill_redelivered_by_rabbitmq_reaches_the_dlq_after_max_resurrections(
    broker, fleet, publisher, r
) -> None:
    # Given acks_late (RabbitMQ redelivers a dead worker's running task at once) and a task
    # that kills its worker every time (max_resurrections=2)
    # When workers keep dying with it, and are replaced
    entry = _poison_until_quarantined(fleet, publisher, r, "q1", 90)
    # Then it ran 1 + 2 times, each death counted whether a takeover or the scanner brought it
    # back (the entry counts the crashes before the last), and the fleet is left clean
    assert entry["reason"] == "max_resurrections" and entry["crashes"] == 2
    assert int(r.get("test:poison:q1")) == 3
    send_work(publisher, range(3))
    wait_all_done(r, set(range(3)), 30, fleet)
    wait_for(lambda: held_records(r) == 0, 15, what="every record to be removed")
    wait_for(lambda: broker.depth() == 0, 15, what="the queue to be empty")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("broker", ["rabbitmq-quorum-limit1"], indirect=True)
def test_a_poison_pill_rabbitmq_dropped_at_its_delivery_limit_still_reaches_the_dlq(
    broker, fleet, publisher, r
) -> None:
    # Given a quorum queue whose x-delivery-limit (1) is below relier's max_resurrections (2):
    # RabbitMQ drops the message the second time its consumer dies with it
    # When workers keep dying with the poison pill
    entry = _poison_until_quarantined(fleet, publisher, r, "q2", 90)
    # Then relier's record still brings it back (its scanner republishes it: a new message,
    # with a delivery count of its own), and it ends in relier's DLQ as on any queue
    assert entry["reason"] == "max_resurrections" and entry["crashes"] == 2
    assert int(r.get("test:poison:q2")) == 3
    logs = "".join(w.log() for w in fleet.workers)
    assert "task.resurrected" in logs
    # (on a queue without the limit, RabbitMQ's third delivery of the first copy would arrive
    # after the scanner's claim and be dropped as a duplicate: it never came)
    assert "delivery 0|0 is not newer" not in logs
    wait_for(lambda: broker.depth() == 0, 15, what="the queue to be empty")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("broker", ["rabbitmq", "rabbitmq-quorum"], indirect=True)
def test_chaos_main_process_kills_with_acks_late_lose_nothing(broker, fleet, publisher, r):
    # Given two workers with acks_late (on a quorum queue, per-consumer QoS: each prefetches
    # 3 x 4 messages) and 240 tasks of random duration
    rng = random.Random(4321)
    for _ in range(2):
        fleet.start(concurrency=3, **ACKS_LATE)
    ids = dict(enumerate(send_work(publisher, range(240), seconds=lambda n: rng.uniform(0, 0.3))))
    # When workers are SIGKILLed (main process and pool) repeatedly and replaced
    kills = 0
    deadline = time.monotonic() + 40
    while kills < 3 and time.monotonic() < deadline and done(r) != set(ids):
        time.sleep(rng.uniform(1.0, 2.0))
        fleet.kill_random(rng)
        kills += 1
        fleet.start(concurrency=3, **ACKS_LATE)
    # Then every task completes, what the dead held taken over at once, and nothing is left
    wait_chaos_done(r, ids, 90, fleet)
    assert kills >= 2, "the run ended before the chaos: make it longer"
    logs = "".join(w.log() for w in fleet.workers)
    assert "task.taken_over" in logs
    twice = [n for n in ids if int(r.get(f"test:runs:{n}") or 0) > 1]
    print(
        f"{broker.queue_args or 'classic'} chaos: {kills} kills, "
        f"{logs.count('task.taken_over')} taken over, "
        f"{logs.count('task.resurrected')} resurrected, ran to the end twice: {twice}"
    )
    wait_for(lambda: held_records(r) == 0, 20, what="every record to be removed")
    wait_for(lambda: broker.depth() == 0, 15, what="the queue to be empty")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("broker", ["rabbitmq-quorum-topic"], indirect=True)
def test_a_countdown_task_through_native_delayed_delivery_is_resurrected_into_its_queue(
    broker, fleet, publisher, r
) -> None:
    # Given a quorum queue on a topic exchange: a countdown task waits in Celery's delayed
    # delivery queues and reaches the task queue through its delivery exchange when due
    workers = [fleet.start(concurrency=1) for _ in range(2)]
    task_id = publisher.send_task("chaos.traced", args=(0, 4.0), countdown=2).id
    wait_for(lambda: r.llen("test:trace"), 20, what="the delayed task to start")
    # When its worker is SIGKILLed mid-run (acked at its start: RabbitMQ has nothing to give
    # back; relier's record is all that is left of it)
    host = json.loads(r.lindex("test:trace", 0))["host"]
    (held,) = [json.loads(v) for k in r.scan_iter("rl:*held:*") for v in r.hvals(k)]
    # It came out of the last delayed-delivery exchange: relier will republish it there
    assert held["exchange"] == "celery_delayed_0", held
    (victim,) = [w for w in workers if w.hostname.split("@")[0] == host.split("@")[0]]
    victim.kill()
    # Then the scanner republishes it where it came from, and it runs again, to the end, once
    wait_all_done(r, {0}, 30, fleet)
    assert r.llen("test:trace") == 3 and int(r.get("test:runs:0")) == 1  # start, start, end
    logs = "".join(w.log() for w in fleet.workers)
    assert f"chaos.traced[{task_id}] republished" in logs
    assert "Direct exchanges are not supported" not in logs  # it took the delayed path
    wait_for(lambda: held_records(r) == 0, 15, what="every record to be removed")
