"""Graceful drain (SIGTERM or `relier drain`): running tasks finish within the window, the rest
is handed off, prefetched messages go back at once, and every task runs exactly once."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import time

import pytest
from fleet import BROKERS, held_records, relier_cli, send_work, wait_all_done

from relier_celery.testing import wait_for
from relier_celery.wiring import drain

CONF = json.dumps({"relier_drain_timeout": 3})


def _load(fleet, publisher, r, acks_late: str):
    """A worker running two 8 s tasks with ten short ones prefetched, and a second worker."""
    env = {"RELIER_TEST_ACKS_LATE": acks_late, "RELIER_TEST_CONF": CONF}
    leaving = fleet.start(concurrency=2, **env)
    send_work(publisher, [0, 1], seconds=8.0)
    wait_for(lambda: r.get("test:started:0") and r.get("test:started:1"), 15, what="long tasks")
    send_work(publisher, range(2, 12), seconds=0.3)
    time.sleep(0.5)
    staying = fleet.start(concurrency=2, **env)
    return leaving, staying


def _relier_drain(fleet, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a real `celery -A chaos_app relier drain ...` against the fleet's Redis and broker."""
    return relier_cli(fleet, "drain", *args)


def _exactly_once(r, fleet) -> None:
    wait_all_done(r, set(range(12)), 60, fleet)
    time.sleep(1.5)
    assert [int(r.get(f"test:runs:{n}") or 0) for n in range(12)] == [1] * 12, fleet.logs()
    wait_for(lambda: held_records(r) == 0, 10, what="every record removed")


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("acks_late", "broker"),
    [("0", "redis"), ("1", "redis"), ("1", "rabbitmq")],
    indirect=["broker"],
)
def test_sigterm_drains_hands_off_and_loses_nothing(fleet, publisher, r, acks_late) -> None:
    leaving, _ = _load(fleet, publisher, r, acks_late)
    # When the busy worker gets SIGTERM
    started = time.monotonic()
    assert leaving.stop(timeout=30) == 0
    # Then it exits soon after its 3 s window, not after its 8 s tasks
    assert time.monotonic() - started < 8
    log = leaving.log()
    assert "relier drain.started" in log
    assert "drained: completed" in log and "handed off 2," in log and "lost 0" in log
    # And every task runs exactly once across the fleet
    _exactly_once(r, fleet)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("broker", BROKERS, indirect=True)
def test_the_remote_drain_command_drains_a_named_worker(fleet, publisher, r) -> None:
    leaving, _ = _load(fleet, publisher, r, "0")
    name = leaving.hostname.replace("%h", socket.gethostname())
    out = _relier_drain(fleet, "-d", name, "--timeout", "2")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{name}: drained: completed" in out.stdout and "lost 0" in out.stdout
    assert leaving.proc is not None and leaving.proc.wait(30) == 0
    _exactly_once(r, fleet)


def test_draining_an_unknown_worker_is_a_clear_error(fleet) -> None:
    fleet.start(concurrency=1)
    out = _relier_drain(fleet, "-d", "nosuch@nowhere")
    assert out.returncode != 0
    assert "no worker named nosuch@nowhere answered" in out.stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_tasks_still_running_at_the_end_get_their_hook_then_move(fleet, publisher, r, pool):
    from relier_celery import TaskContext, install

    leaving = fleet.start(pool=pool, concurrency=2, RELIER_TEST_CONF=CONF)
    task_id = publisher.send_task("chaos.long_with_hook", args=(50, 6.0)).id
    wait_for(lambda: r.get("test:started:50"), 15, what="the long task to start")
    leaving.stop(timeout=30)
    # (the next worker starts after the drain: on a loaded machine its start could outlast
    # the task, which would then end before the drain and never need its hook)
    fleet.start(pool=pool, concurrency=2, RELIER_TEST_CONF=CONF)
    install(publisher)
    assert TaskContext.load_progress(publisher, task_id) == {"step": "halfway", "n": 50}
    assert "still running at the end of its worker's drain; hook runs" in leaving.log()
    wait_all_done(r, {50}, 30, fleet)
    assert int(r.get("test:runs:50")) == 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("broker", BROKERS, indirect=True)
def test_a_second_sigterm_hurries_the_hand_off(fleet, publisher, r) -> None:
    slow = json.dumps({"relier_drain_timeout": 20})
    leaving = fleet.start(concurrency=2, RELIER_TEST_CONF=slow)
    send_work(publisher, [0, 1], seconds=8.0)
    wait_for(lambda: r.get("test:started:0") and r.get("test:started:1"), 15, what="starts")
    fleet.start(concurrency=2, RELIER_TEST_CONF=slow)
    started = time.monotonic()
    leaving.kill(signal.SIGTERM)
    time.sleep(1)
    leaving.kill(signal.SIGTERM)
    assert leaving.proc is not None and leaving.proc.wait(30) == 0
    assert time.monotonic() - started < 8  # not the 20 s window
    assert "drain.hurried" in leaving.log()
    wait_all_done(r, {0, 1}, 40, fleet)
    assert [int(r.get(f"test:runs:{n}")) for n in (0, 1)] == [1, 1]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("broker", BROKERS, indirect=True)
def test_sigkill_during_the_drain_still_loses_nothing(fleet, publisher, r) -> None:
    leaving, _ = _load(fleet, publisher, r, "0")
    leaving.kill(signal.SIGTERM)
    time.sleep(1)  # mid-drain: prefetched tasks handed off, long ones still running
    leaving.kill(signal.SIGKILL)
    wait_all_done(r, set(range(12)), 60, fleet)
    wait_for(lambda: held_records(r) == 0, 20, what="every record removed")


@pytest.mark.timeout(120)
def test_the_same_drain_with_sigterm_remapped_to_a_soft_cold_shutdown(fleet, publisher, r):
    # Celery's own soft shutdown: SIGTERM remapped to SIGQUIT, 1 s of soft shutdown, then
    # running tasks are cancelled (with acks_late off, Celery alone would lose them)
    conf = json.dumps({"relier_drain_timeout": 3, "worker_soft_shutdown_timeout": 1})
    env = {"RELIER_TEST_CONF": conf, "REMAP_SIGTERM": "SIGQUIT"}
    leaving = fleet.start(concurrency=2, **env)
    send_work(publisher, [0, 1], seconds=8.0)
    wait_for(lambda: r.get("test:started:0") and r.get("test:started:1"), 15, what="starts")
    send_work(publisher, range(2, 12), seconds=0.3)
    time.sleep(0.5)
    fleet.start(concurrency=2, **env)
    leaving.kill(signal.SIGTERM)
    assert leaving.proc is not None
    leaving.proc.wait(30)
    _exactly_once(r, fleet)


@pytest.mark.timeout(240)
def test_tasks_ending_at_the_edge_of_the_drain_window_run_exactly_once(fleet, publisher, r):
    # Given, round after round, a worker whose running tasks end right at the edge of its
    # drain window (2 s, then the 1 s its tasks' hooks get), some just before, some just after
    conf = json.dumps({"relier_drain_timeout": 2})
    rng = random.Random(14)
    sent: list[int] = []
    for round_ in range(4):
        leaving = fleet.start(concurrency=3, RELIER_TEST_CONF=conf)
        sigterm_at = time.time() + 6.0
        ns = [round_ * 10 + i for i in range(3)]
        for n in ns:
            edge = sigterm_at + 2.0 + drain.HOOK_GRACE
            publisher.send_task("chaos.until", args=(n, edge + rng.uniform(-0.15, 0.15)))
        sent += ns
        wait_for(lambda ns=ns: all(r.get(f"test:started:{n}") for n in ns), 15, what="starts")
        staying = fleet.start(concurrency=3, RELIER_TEST_CONF=conf)
        # When it gets SIGTERM
        time.sleep(max(sigterm_at - time.time(), 0.0))
        leaving.kill(signal.SIGTERM)
        assert leaving.proc is not None and leaving.proc.wait(30) == 0
        wait_all_done(r, set(sent), 30, fleet)
        staying.stop(timeout=20)
    # Then every task completed exactly once: none both finished here and handed off
    time.sleep(1.0)
    runs = {n: int(r.get(f"test:runs:{n}") or 0) for n in sent}
    assert all(v == 1 for v in runs.values()), runs
    assert held_records(r) == 0
