"""Bad configuration, Redis faults, duplicate deliveries (G4) and oversized messages."""

from __future__ import annotations

import base64
import json
import signal
import time
from collections.abc import Iterator

import pytest
import redis
from fleet import (
    BROKERS,
    FETCH_MODES,
    dlq_entries,
    done,
    fetch_env,
    held_records,
    send_work,
    wait_all_done,
)

from relier_celery.testing import RedisServer, free_port, wait_for


@pytest.fixture
def split_redis() -> Iterator[tuple[RedisServer, RedisServer]]:
    """Relier's Redis and, apart, the broker's: the broker can stop while relier's stays."""
    store = RedisServer()
    store.start()
    broker = RedisServer()
    broker.start()
    try:
        yield store, broker
    finally:
        broker.stop()
        store.stop()


def _refused(fleet, **env: str) -> str:
    w = fleet.start(wait=False, **env)
    assert w.proc is not None
    w.proc.wait(60)
    assert w.proc.returncode != 0, w.log()
    return w.log()


def test_a_mistyped_setting_stops_the_worker_naming_the_key(fleet) -> None:
    log = _refused(fleet, RELIER_TEST_CONF=json.dumps({"relier_lease_tll": 5}))
    assert "unknown setting 'relier_lease_tll': did you mean 'relier_lease_ttl'?" in log


def test_a_lease_not_above_the_heartbeat_stops_the_worker(fleet) -> None:
    log = _refused(fleet, RELIER_TEST_CONF=json.dumps({"relier_lease_ttl": 0.5}))
    assert "relier_lease_ttl (0.5 s) must be above relier_heartbeat_interval" in log


def test_a_mistyped_relier_task_option_stops_the_worker(fleet) -> None:
    log = _refused(fleet, RELIER_TEST_BAD_TASK="1")
    assert "task 'chaos.typo' has unknown relier option 'max_resurections'" in log
    assert "did you mean 'max_resurrections'?" in log


def test_unreachable_redis_at_startup_stops_the_worker_clearly(fleet) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    log = _refused(fleet, RELIER_TEST_CONF=json.dumps({"relier_redis_url": dead}))
    assert "relier cannot reach Redis at" in log


@pytest.mark.timeout(120)
@pytest.mark.parametrize("reliable", FETCH_MODES)
def test_no_task_runs_twice_while_its_worker_lives_despite_visibility_redelivery(
    fleet, publisher, r, reliable
) -> None:
    # Given acks_late and a 1 s visibility timeout: the Redis transport redelivers every
    # unacked message after 1 s, while our tasks take 4 s
    env = {"RELIER_TEST_ACKS_LATE": "1", "RELIER_TEST_VISIBILITY": "1", "RELIER_TEST_PREFETCH": "1"}
    env.update(fetch_env(reliable))
    workers = [fleet.start(concurrency=2, **env) for _ in range(2)]
    # When 4 long tasks run
    send_work(publisher, range(4), seconds=4.0)
    wait_all_done(r, set(range(4)), 60, fleet)
    time.sleep(2)  # let any late duplicate start, if one were going to
    # Then each ran exactly once: with the reliable fetch nothing was redelivered at all;
    # with kombu's fetch the redeliveries were dropped as duplicates
    assert [int(r.get(f"test:started:{n}") or 0) for n in range(4)] == [1, 1, 1, 1]
    dropped = any("task.duplicate_dropped" in w.log() for w in workers)
    assert dropped != reliable, fleet.logs()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("broker", BROKERS, indirect=True)
def test_relier_redis_down_leaves_messages_with_the_broker_until_it_returns(
    fleet, publisher, r, tmp_path
) -> None:
    # Given relier on its own Redis, apart from the broker
    store = RedisServer()
    store.start()
    try:
        w = fleet.start(concurrency=2, RELIER_TEST_CONF=json.dumps({"relier_redis_url": store.url}))
        # When relier's Redis goes away and tasks arrive
        store.stop()
        send_work(publisher, range(10), seconds=0.1)
        # Then nothing runs unrecorded, and the worker says so loudly
        wait_for(lambda: "store.unavailable" in w.log(), 20, what="a loud error")
        time.sleep(1.5)
        assert done(r) == set()
        # And when it returns, every task runs and completes
        store.start()
        wait_all_done(r, set(range(10)), 40, fleet)
        assert "store.recovered" in w.log()
        wait_for(
            lambda: held_records(redis.Redis.from_url(store.url)) == 0,
            10,
            what="records to be removed",
        )
    finally:
        store.stop()


@pytest.mark.timeout(150)
def test_a_broker_restart_does_not_strand_prefetched_tasks(fleet, split_redis) -> None:
    # Given relier's Redis apart from the broker's, and a broker that loses everything on
    # restart (no persistence): a worker has prefetched tasks it has not started
    from celery import Celery

    store, broker = split_redis
    results = redis.Redis.from_url(store.url, decode_responses=True)
    conf = json.dumps({"relier_redis_url": store.url})
    env = {
        "concurrency": 1,
        "RELIER_TEST_REDIS": broker.url,
        "RELIER_TEST_CONF": conf,
        "RELIER_TEST_RESULTS": store.url,
        "RELIER_TEST_PREFETCH": "8",
    }
    w = fleet.start(**env)
    app = Celery("pub", broker=broker.url)
    for n in range(6):
        app.send_task("chaos.work", args=(n, 1.0))
    app.close()
    # (messages still queued in the broker are lost with it: only relier's records, of
    # received messages, can come back)
    wait_for(lambda: w.log().count("] received") == 6, 20, what="the worker to receive every task")
    # When the broker restarts (Celery restarts its consumer and forgets reserved tasks;
    # kombu 5.7 sometimes crashes the worker instead, in restore_unacked, and a supervisor
    # starts a new one, whose scanner takes over)
    broker.stop()
    time.sleep(1)
    broker.start()

    def all_done() -> bool:
        if not fleet.alive():
            fleet.start(**env)
        return {int(x) for x in results.smembers("test:done")} >= set(range(6))

    # Then relier republishes them from its records and every task completes
    wait_for(all_done, 90, interval=0.2, what=f"every task to complete\n{fleet.logs()}")
    logs = "".join(w.log() for w in fleet.workers)
    assert "task.resurrected" in logs or "task.handed_off" in logs


@pytest.mark.parametrize("reliable", FETCH_MODES)
def test_a_message_too_large_to_record_runs_with_a_loud_error(fleet, publisher, r, reliable):
    conf = {"relier_max_message_bytes": 200, "relier_reliable_fetch": reliable}
    w = fleet.start(concurrency=1, RELIER_TEST_CONF=json.dumps(conf))
    # Given a 200-byte limit, When a small and a large task arrive
    publisher.send_task("chaos.work", args=(1, 0.0))
    publisher.send_task("chaos.work", args=(2, 0.0), kwargs={"pad": "y" * 1000})
    # Then both run. Recorded at receipt (kombu's fetch), the large one is reported as running
    # without protection; the reliable fetch has it in Redis already, so it is protected.
    wait_all_done(r, {1, 2}, 30, fleet)
    assert w.log().count("task.unprotected") == (0 if reliable else 1)


def test_an_unknown_task_lands_in_the_dlq_with_its_payload(fleet, publisher, r) -> None:
    w = fleet.start(concurrency=1)
    task_id = publisher.send_task("chaos.never_registered", args=("keep me",)).id
    wait_for(lambda: dlq_entries(r), 20, what=f"a DLQ entry\n{w.log()[-3000:]}")
    (entry,) = dlq_entries(r)
    assert entry["task_id"] == task_id and entry["reason"] == "unknown_task"
    assert "no task named 'chaos.never_registered'" in entry["error"]
    assert json.loads(base64.b64decode(entry["message"]["body"]))[0] == ["keep me"]
    # and the worker goes on serving
    send_work(publisher, range(3))
    wait_all_done(r, set(range(3)), 20, fleet)


@pytest.mark.timeout(90)
def test_a_prefork_workers_scanner_keeps_scanning_after_its_consumer_restarted(
    fleet, publisher, r
) -> None:
    from relier_celery.core.keys import Keys

    # Given a prefork worker (its scanner on Celery's event loop) whose broker connection
    # Redis dropped: its consumer restarted
    survivor = fleet.start(concurrency=2, RELIER_TEST_PREFETCH="1")
    r.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    wait_for(
        lambda: "Connection to broker lost" in survivor.log(), 20, what="its consumer to restart"
    )
    # When a second worker holds tasks and is SIGKILLed mid-task (8 tasks: the first worker
    # takes at most 4, two running, acked at their start, and two prefetched; with 4 it once
    # took them all and the second worker held none)
    victim = fleet.start(concurrency=2, RELIER_TEST_PREFETCH="1")
    send_work(publisher, range(8), seconds=3.0)

    def victim_holds() -> int:  # its worker id starts with its hostname, w2@<host>
        return sum(int(r.hlen(k)) for k in r.scan_iter(Keys("rl").held("w2@*")))

    wait_for(victim_holds, 20, what="the second worker to hold tasks")
    victim.kill(signal.SIGKILL)
    # Then the survivor's scanner, on the restarted loop, brings them back: all complete
    wait_all_done(r, set(range(8)), 45, fleet)
    assert "task.resurrected" in survivor.log()


@pytest.mark.timeout(120)
def test_a_prefork_worker_keeps_its_lease_while_its_event_loop_stands_still(
    fleet, split_redis
) -> None:
    # Given a prefork worker (its heartbeat on Celery's event loop, lease 3 s) running a task
    # of 8 s, relier's Redis apart from the broker's
    from celery import Celery

    store, broker = split_redis
    results = redis.Redis.from_url(store.url, decode_responses=True)
    env = {
        "concurrency": 1,
        "RELIER_TEST_REDIS": broker.url,
        "RELIER_TEST_CONF": json.dumps({"relier_redis_url": store.url}),
        "RELIER_TEST_RESULTS": store.url,
    }
    w = fleet.start(**env)
    assert w.pid is not None
    wait_for(lambda: len(_threads(w.pid)) == 1, 10, what=f"one thread\n{w.log()}")
    app = Celery("pub", broker=broker.url)
    app.send_task("chaos.work", args=(0, 8.0))
    app.close()
    wait_for(lambda: results.get("test:started:0"), 20, what=f"the task to start\n{w.log()}")
    # When the broker is gone for 5 s: Celery's consumer waits to reconnect, its event
    # loop stands still, longer than the lease
    broker.stop()
    wait_for(lambda: len(_threads(w.pid)) == 2, 5, what=f"the heartbeat thread\n{w.log()}")
    time.sleep(5)
    broker.start()
    # Then the heartbeat thread kept the lease: the task ran once, to its end, and the
    # thread ended once the loop turned again
    wait_for(lambda: results.get("test:runs:0"), 30, what=f"the task to end\n{w.log()}")
    assert "lease.lost" not in w.log()
    assert (results.get("test:started:0"), results.get("test:runs:0")) == ("1", "1")
    wait_for(lambda: len(_threads(w.pid)) == 1, 10, what=f"one thread again\n{w.log()}")


def _threads(pid: int) -> list[str]:
    import os

    return os.listdir(f"/proc/{pid}/task")
