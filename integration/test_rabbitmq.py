"""Issue 17: RabbitMQ as the broker, relier's state in Redis. RabbitMQ gives a dead consumer's
unacknowledged messages back at once; relier runs them at once too when their holder is gone
(its presence connection closed), instead of dropping them until its lease runs out; on a
classic and on a quorum queue."""

from __future__ import annotations

import os
import signal
import socket
import struct
import time
from pathlib import Path

import pytest
from fleet import close_amqp_connections, done, held_records, send_work, wait_all_done

from relier_celery.core.keys import Keys
from relier_celery.testing import wait_for

pytestmark = pytest.mark.integration

# A lease far longer than the test: whatever runs again ran through the broker's redelivery.
# A classic queue and a quorum queue (Celery's worker_detect_quorum_queues: per-consumer QoS).
RABBITS = ["rabbitmq", "rabbitmq-quorum"]
LONG_LEASE = {"RELIER_TEST_LEASE_TTL": "60", "RELIER_TEST_ACKS_LATE": "1"}


def _started(r, n: int) -> int:
    return int(r.get(f"test:started:{n}") or 0)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("broker", RABBITS, indirect=True)
def test_a_dead_holders_redelivered_tasks_run_at_once_not_after_its_lease(
    broker, fleet, publisher, r
) -> None:
    # Given a worker running and prefetching 8 tasks of 2 s (acks_late), and a second one idle
    victim = fleet.start(concurrency=2, **LONG_LEASE)
    send_work(publisher, range(8), seconds=2.0)
    wait_for(lambda: _started(r, 0) and _started(r, 1), 20, what="two tasks to start")
    survivor = fleet.start(concurrency=4, **LONG_LEASE)
    # When the first worker is SIGKILLed (main process and pool) mid-task
    victim.kill(signal.SIGKILL)
    killed = time.monotonic()
    # Then every task runs on the survivor within a few seconds, 55 s before the lease would
    # have let anything run again; none twice (the killed ones started twice, finished once)
    wait_all_done(r, set(range(8)), 20, fleet)
    assert time.monotonic() - killed < 12, "recovery waited for the lease"
    assert [int(r.get(f"test:runs:{n}") or 0) for n in range(8)] == [1] * 8
    assert "task.taken_over" in survivor.log()
    assert "task.duplicate_dropped" not in survivor.log()
    wait_for(lambda: held_records(r) == 0, 10, what="records to be removed")
    assert broker.depth() == 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("broker", RABBITS, indirect=True)
def test_a_taken_over_task_runs_before_the_newer_work_its_new_worker_prefetched(
    broker, fleet, publisher, r
) -> None:
    # Given a worker running task 0 (acks_late), prefetching nothing more
    victim = fleet.start(concurrency=1, RELIER_TEST_PREFETCH="1", **LONG_LEASE)
    publisher.send_task("chaos.until", args=(0, time.time() + 20))
    wait_for(lambda: _started(r, 0), 20, what="task 0 to start")
    # And a second worker whose one pool process runs task 1 for 3 s, with the newer tasks 2 to
    # 4 prefetched, waiting for it, and room for one more message
    fleet.start(concurrency=1, RELIER_TEST_PREFETCH="5", **LONG_LEASE)
    send_work(publisher, range(1, 2), seconds=3.0)
    send_work(publisher, range(2, 5), seconds=0.1)
    wait_for(lambda: _started(r, 1) and broker.depth() == 0, 20, what="tasks 2-4 prefetched")
    # When the first worker is SIGKILLed: RabbitMQ gives task 0 back, to the second worker
    victim.kill(signal.SIGKILL)
    # Then task 0, taken over, runs there next, before the newer tasks (as RabbitMQ put it back
    # at the head of the queue); vanilla Celery runs it last
    wait_all_done(r, set(range(5)), 40, fleet)
    assert [int(n) for n in r.lrange("test:order", 0, -1)] == [0, 1, 0, 2, 3, 4], fleet.logs()
    assert "task.taken_over" in fleet.logs()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_a_live_holder_whose_connection_closed_keeps_its_tasks(broker, fleet, publisher, r):
    # Given a worker running 2 tasks of 6 s (acks_late), and a second one idle
    holder = fleet.start(concurrency=2, **LONG_LEASE)
    send_work(publisher, range(2), seconds=6.0)
    wait_for(lambda: _started(r, 0) and _started(r, 1), 20, what="both tasks to start")
    survivor = fleet.start(concurrency=2, **LONG_LEASE)
    # When RabbitMQ closes the holder's connection (as an operator or a network fault would):
    # the holder lives and runs them on, and RabbitMQ gives their messages to the idle worker
    assert close_amqp_connections(holder.pid) >= 1
    both = (holder, survivor)  # (one may come back to the holder once it reconnected)
    wait_for(
        lambda: sum(w.log().count("task.duplicate_dropped") for w in both) >= 2,
        30,
        what=f"the redeliveries to be checked\n{fleet.logs()}",
    )
    # Then the receipts found the holder present: dropped as duplicates, each task ran once,
    # on the holder, which still completes them (its records are removed)
    wait_all_done(r, {0, 1}, 40, fleet)
    time.sleep(2)
    assert [_started(r, n) for n in range(2)] == [1, 1], fleet.logs()
    assert [int(r.get(f"test:runs:{n}") or 0) for n in range(2)] == [1, 1]
    assert not any("task.taken_over" in w.log() for w in both)
    wait_for(lambda: held_records(r) == 0, 10, what=f"records to be removed\n{fleet.logs()}")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_a_live_holders_tasks_are_never_taken_over(broker, fleet, publisher, r) -> None:
    # Given two live workers sharing 12 tasks of 1 s with acks_late
    fleet.start(concurrency=2, **LONG_LEASE)
    fleet.start(concurrency=2, **LONG_LEASE)
    send_work(publisher, range(12), seconds=1.0)
    # When they all complete
    wait_all_done(r, set(range(12)), 40, fleet)
    # Then each ran once and nothing was taken over: no holder was ever gone
    assert [int(r.get(f"test:runs:{n}") or 0) for n in range(12)] == [1] * 12
    assert "task.taken_over" not in fleet.logs()
    assert done(r) == set(range(12))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_a_prefork_workers_main_process_runs_no_thread_of_reliers(
    broker, fleet, publisher, r
) -> None:
    # Given a prefork worker that ran tasks (a counted event's flusher would have started)
    worker = fleet.start(concurrency=2, **LONG_LEASE)
    send_work(publisher, range(2), seconds=0.1)
    wait_all_done(r, {0, 1}, 20, fleet)
    # Then its main process has one thread, as a vanilla worker's: the heartbeat, the scanner
    # and the counters run on Celery's event loop (the heartbeat thread that started with the
    # lease ends once the loop turns). A SIGKILLed process with more threads dies slower, and
    # RabbitMQ redelivers only once its sockets are closed (docs/rabbitmq-recovery.md)
    wait_for(
        lambda: len(os.listdir(f"/proc/{worker.pid}/task")) == 1,
        10,
        what=f"one thread in the main process\n{fleet.logs()}",
    )


@pytest.mark.timeout(90)
@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_a_task_that_finished_does_not_run_again_when_its_worker_dies_before_the_ack(
    broker, fleet, publisher, r
) -> None:
    # Given a worker running a task of 5 s (acks_late), and a second one idle (5 s: longer than
    # the second worker takes to start on a loaded machine; with 1 s the task once ended, and
    # was acked, before the first one was stopped)
    holder = fleet.start(concurrency=1, **LONG_LEASE)
    send_work(publisher, range(1), seconds=5.0)
    wait_for(lambda: _started(r, 0), 20, what="the task to start")
    survivor = fleet.start(concurrency=1, **LONG_LEASE)
    assert 0 not in done(r), "the task ended before its worker could be stopped"
    # When the holder's main process stops (its pool process runs the body to its end, but
    # the main process never hears of it, nor acks the message), then is SIGKILLed
    os.kill(holder.pid, signal.SIGSTOP)
    wait_all_done(r, {0}, 20, fleet)
    wait_for(
        lambda: held_records(r) == 0,
        10,
        what=f"the pool process to record the completion itself\n{fleet.logs()}",
    )
    holder.kill(signal.SIGKILL)
    # Then RabbitMQ's redelivery is dropped as a duplicate: the task ran once
    wait_for(
        lambda: "task.duplicate_dropped" in survivor.log(),
        20,
        what=f"the redelivery to be checked\n{fleet.logs()}",
    )
    assert int(r.get("test:runs:0") or 0) == 1
    assert "task.taken_over" not in survivor.log()
    assert broker.depth() == 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_a_completion_the_pool_process_could_not_record_is_recorded_by_its_worker(
    broker, fleet, publisher, r, redis_url, tmp_path
) -> None:
    # Given a worker running a task whose body needs Redis no more
    worker = fleet.start(concurrency=1, **LONG_LEASE)
    release = tmp_path / "release"
    publisher.send_task("chaos.done_then_wait", args=(0, str(release)))
    wait_for(lambda: _started(r, 0), 20, what="the task to start")
    (field,) = r.hkeys(Keys("rl").held(_worker_id(r)))
    done_key = Keys("rl").done(field.rsplit("|", 2)[0])
    # When its pool process cannot reach Redis as the task ends: Redis takes no new
    # connection, and the pool process's own are closed (the worker's main process keeps its)
    (pool,) = Path(f"/proc/{worker.pid}/task/{worker.pid}/children").read_text().split()
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    r.config_set("maxclients", 1)
    try:
        for addr in _connections_to(int(pool), port, but_not=worker.pid):
            r.client_kill_filter(addr=addr)
        release.touch()
        wait_for(
            lambda: "could not record the completion of chaos.done_then_wait" in worker.log(),
            30,
            what=f"the pool process to fail to record the completion\n{fleet.logs()}",
        )
        # Then the worker's heartbeat records it: no record is left for a scanner to run the
        # finished task again, and a later redelivery finds the done marker
        wait_for(
            lambda: held_records(r) == 0,
            10,
            what=f"the worker to record the completion\n{fleet.logs()}",
        )
    finally:
        r.config_set("maxclients", 10000)
    assert r.exists(done_key)
    assert int(r.get("test:runs:0") or 0) == 1


def _worker_id(r) -> str:
    """The one worker holding a lease (its id, as in its held hash's key)."""
    keys = Keys("rl")
    (key,) = r.scan_iter(keys.held("*"))
    return str(key)[len(keys.held("")) :]


def _connections_to(pid: int, port: int, but_not: int) -> list[str]:
    """The client side addresses (ip:port) of ``pid``'s TCP connections to ``port`` on
    loopback that process ``but_not`` does not share (a forked child inherits its parent's
    sockets), read from /proc: what CLIENT KILL ADDR names."""
    inodes = _sockets(pid) - _sockets(but_not)
    addrs = []
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if inode in inodes and int(remote.split(":")[1], 16) == port:
            ip, local_port = local.split(":")
            addrs.append(
                f"{socket.inet_ntoa(struct.pack('<I', int(ip, 16)))}:{int(local_port, 16)}"
            )
    return addrs


def _sockets(pid: int) -> set[str]:
    """The inodes of the sockets ``pid`` has open."""
    targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    return {t[len("socket:[") : -1] for t in targets if t.startswith("socket:[")}
