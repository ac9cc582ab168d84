"""Idempotent tasks in real workers: concurrent duplicates produce one side effect."""

from __future__ import annotations

import json
import random
import time

import pytest
from fleet import BROKERS, dlq_entries, wait_all_done

from relier_celery.testing import wait_for


@pytest.mark.timeout(120)
@pytest.mark.parametrize("broker", BROKERS, indirect=True)
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

    from relier_celery.core.keys import Keys
    from relier_celery.features.idempotency import default_key

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
    # Then the stored result is the one of the worker that took over (stored after its task
    # returned: the paused run, whose sleep had run out while it was stopped, may push its
    # own line first; one suite run read the key in between)
    key = Keys("rl").idempotency(default_key("chaos.fenced", [5, 6.0], {}))
    wait_for(lambda: r.hget(key, "result"), 10, what="the stored result")
    assert json.loads(r.hget(key, "result")) == first
    # and the paused worker was fenced out: its late result refused, or its run stopped by the
    # lease gate when it woke (issue 14) before it reached the store
    fenced = ("idempotency.fenced", "task.fenced", "lease.given_up")
    wait_for(lambda: any(e in paused.log() for e in fenced), 10, what="the fenced-out event")
    assert "idempotency.takeover" in other.log()


def _chaos(
    fleet, publisher, r, task: str, orders: int, rng: random.Random
) -> tuple[list[int], dict[int, float]]:
    """Dispatch every order twice (duplicates), SIGKILL workers mid-run and replace them;
    acks_late with a 2 s visibility timeout makes the broker redeliver running tasks too.
    Return the main-process PIDs killed and each order's duration argument."""
    fleet.env.update(RELIER_TEST_ACKS_LATE="1", RELIER_TEST_VISIBILITY="2")
    for _ in range(3):
        fleet.start(concurrency=2)
    seconds = {order: round(rng.uniform(0.4, 1.6), 2) for order in range(orders)}
    for order in range(orders):
        for _ in range(2):
            publisher.send_task(task, args=(order, seconds[order]))
    kind = "paid" if task == "chaos.pay" else "strict"
    killed: list[int] = []
    deadline = time.monotonic() + 30
    while len(killed) < 4 and time.monotonic() < deadline:
        time.sleep(rng.uniform(0.5, 1.0))
        # a worker that is running a payment right now
        running = {int(ppid) for ppid in r.hvals(f"test:{kind}:running")}
        victims = [w for w in fleet.alive() if w.pid in running]
        if not victims:
            continue
        victim = rng.choice(victims)
        victim.kill()
        killed.append(victim.pid)
        # not waiting for it to be ready: on a loaded machine that would use up the deadline
        fleet.start(concurrency=2, wait=False)
    return killed, seconds


def _effects(r, kind: str, order: int) -> list[tuple[int, int]]:
    return [tuple(map(int, x.split(":"))) for x in r.lrange(f"test:{kind}:{order}", 0, -1)]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("broker", BROKERS, indirect=True)
def test_chaos_idempotent_side_effects_happen_once_per_key(fleet, publisher, r) -> None:
    # Given 30 idempotent payments, each dispatched twice, on workers SIGKILLed mid-run
    orders = 30
    killed, seconds = _chaos(fleet, publisher, r, "chaos.pay", orders, random.Random(5))
    # Then every payment completes
    wait_for(
        lambda: r.scard("test:paid:done") == orders, 90, what=f"{orders} payments\n{fleet.logs()}"
    )
    assert len(killed) >= 3
    # And each was made once. A run is repeated only when its worker died after the side
    # effect and before the result was stored (one Redis round trip): allowed, and counted.
    repeated_in_window = 0
    for order in range(orders):
        effects = _effects(r, "paid", order)
        assert effects, order
        assert all(ppid in killed for ppid, _ in effects[:-1]), (order, effects, killed)
        repeated_in_window += len(effects) - 1
    assert repeated_in_window <= 1, f"{repeated_in_window} repeats in the crash window"
    interrupted = sum(r.llen(f"test:paid:started:{o}") for o in range(orders)) - orders
    print(
        f"runs interrupted and repeated: {interrupted}; repeats after the effect: "
        f"{repeated_in_window}"
    )
    assert interrupted >= 1, "no run was interrupted: the chaos proved nothing"

    # And a late duplicate of every payment is a cache hit, not a new charge
    def hits() -> int:
        return sum(w.log().count("relier idempotency.hit") for w in fleet.workers)

    before = hits()
    for order in range(orders):
        publisher.send_task("chaos.pay", args=(order, seconds[order]))
    wait_for(lambda: hits() - before >= orders, 30, what=f"{orders} cache hits")
    assert sum(len(_effects(r, "paid", o)) for o in range(orders)) == orders + repeated_in_window


@pytest.mark.timeout(180)
def test_chaos_quarantine_mode_never_repeats_an_effect(fleet, publisher, r) -> None:
    # Given 30 payments that must never repeat unasked, dispatched twice, workers SIGKILLed
    orders = 30
    _chaos(fleet, publisher, r, "chaos.pay_strict", orders, random.Random(6))

    def settled() -> set[int]:
        return {int(x) for x in r.smembers("test:strict:done")} | _quarantined_orders(r)

    # Then every payment either completed or waits in the DLQ for an operator
    wait_for(lambda: len(settled()) == orders, 90, what=f"{orders} settled\n{fleet.logs()}")
    # And no side effect ever happened twice
    for order in range(orders):
        assert len(_effects(r, "strict", order)) <= 1, order
    reasons = {e["reason"] for e in dlq_entries(r)}
    assert reasons <= {"idempotency_interrupted"}, reasons
    assert _quarantined_orders(r), "no run was interrupted: the chaos proved nothing"


def _quarantined_orders(r) -> set[int]:
    out = set()
    for entry in dlq_entries(r):
        if entry["reason"] == "idempotency_interrupted":
            out.add(int(entry["error"].split("'strict-", 1)[1].split("'", 1)[0]))
    return out


def test_an_idempotent_task_whose_pool_process_died_runs_again_at_once(fleet, publisher, r):
    # Given an idempotent task whose pool process is killed mid-run (its claim left behind,
    # under the lease of a worker that is still alive)
    fleet.start(concurrency=1)
    publisher.send_task("chaos.idem_oom", args=("o1",))
    # Then its resurrection (same task id) takes its own stale claim over and completes,
    # instead of waiting for the claim to expire (idempotency_ttl)
    wait_for(lambda: "o1" in r.smembers("test:done"), 20, what="the resurrected task")
    assert int(r.get("test:attempts:o1")) == 2
