"""Delivery when workers die: tasks lost and run twice under whole-worker SIGKILLs, and the
time from a SIGKILL to each task the worker was running starting again elsewhere."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from functools import partial
from typing import Any, cast

import redis
from celery import Celery
from kombu.transport.redis import Channel

from relier_celery.bench.harness import Harness, kill_all, pcts, running, terminate
from relier_celery.bench.timing import wait_until
from relier_celery.testing import WorkerProcess

__all__ = [
    "DLQ",
    "chaos_loss",
    "kill_each_second",
    "quiescent",
    "recovery",
    "restarts",
    "settle",
    "starts",
]

# relier's keys at default settings (bench_app sets no relier_prefix): the DLQ, and the hash
# of what each worker holds.
DLQ = "rl:{rl}:dlq"
HELD = "rl:{rl}:held:*"
# The queue every benchmark task goes to, and kombu's hash of messages taken but not acked.
QUEUE = "celery"
UNACKED = Channel.unacked_key
# Seconds without progress, with nothing left to run, after which a phase is over.
IDLE = 2.0


def alive(fleet: list[WorkerProcess]) -> list[WorkerProcess]:
    return [w for w in fleet if w.proc is not None and w.proc.poll() is None]


def starts(r: redis.Redis, n: int) -> list[tuple[float, str]]:
    """Each start of task ``n``: (time, worker hostname)."""
    return [_start(x) for x in cast(list[str], r.lrange(f"bench:starts:{n}", 0, -1))]


def _start(raw: str) -> tuple[float, str]:
    at, host = raw.split("|", 1)
    return float(at), host


def restarts(r: redis.Redis, tasks: int, killed: dict[str, float]) -> list[list[float]]:
    """Seconds from each SIGKILL to each task its worker was running starting again, kill by
    kill (those of one kill are not independent of each other). A run that ended all the same
    (``bench:ends``: before the kill, its ack lost, or in a pool process that outlived its main
    process for a moment) is not one: running it again is a second run, not a recovery."""
    delays: dict[str, list[float]] = {host: [] for host in killed}
    pipe = r.pipeline(transaction=False)  # every task's two lists in one round trip
    for n in range(tasks):
        pipe.lrange(f"bench:starts:{n}", 0, -1)
        pipe.lrange(f"bench:ends:{n}", 0, -1)
    lists = cast(list[list[str]], pipe.execute())
    for raw, ends in zip(lists[::2], lists[1::2], strict=True):
        ended = set(ends)
        runs = [_start(x) for x in raw]
        for (at, host), start in zip(runs, raw, strict=True):
            kill = killed.get(host)
            if kill is None or at > kill or start in ended:
                continue
            later = [t for t, _ in runs if t > kill]
            if later:
                delays[host].append(min(later) - kill)
    return [d for d in delays.values() if d]


def kill_each_second(
    r: redis.Redis,
    fleet: list[WorkerProcess],
    tasks: int,
    kills: int,
    rng: random.Random,
    replace: Callable[[], WorkerProcess],
    killed: dict[str, float] | None = None,
) -> int:
    """SIGKILL a random live worker of ``fleet`` every second and add ``replace()`` to it,
    until ``kills`` kills or all ``tasks`` ended (``bench:ended``); return the kills done.
    ``killed``: filled with each killed worker's hostname and the time of its SIGKILL."""
    done = 0
    for _ in range(kills):
        time.sleep(1.0)
        if r.scard("bench:ended") >= tasks:
            break
        victim = rng.choice(alive(fleet))
        if killed is not None:
            killed[victim.hostname] = time.time()
        victim.kill(signal.SIGKILL)
        done += 1
        fleet.append(replace())
    return done


def quiescent(r: redis.Redis) -> bool:
    """Nothing waits in the queue and relier holds nothing (no held record of any worker,
    dead ones included, whose tasks a scanner has yet to put back): no more progress can come,
    short of kombu's ``unacked`` copies, which come back only after ``visibility_timeout``."""
    if r.llen(QUEUE):
        return False
    return not any(r.hlen(key) for key in r.scan_iter(HELD, count=1000))


def settle(
    r: redis.Redis, done: Callable[[], int], total: int, still: float, deadline: float
) -> None:
    """Wait until ``done()`` reaches ``total``; or it has not moved for ``IDLE`` s with nothing
    left to run (:func:`quiescent`), or for ``still`` s whatever the reason; or the deadline."""
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = int(done())
        if now >= total:
            return
        if now != last:
            last, since = now, time.monotonic()
        else:
            idle = time.monotonic() - since
            if idle >= still or (idle >= IDLE and quiescent(r)):
                return
        time.sleep(0.2)


def chaos_loss(
    h: Harness, relier: bool, tasks: int, kills: int, still: float, seed: int = 5
) -> dict[str, Any]:
    """``tasks`` short tasks (0-5 ms) on two workers of two processes, one whole worker
    SIGKILLed every second and replaced at once; then wait until all ran or nothing moved for
    ``still`` s (:func:`settle`). Delivered, lost, ran twice; quarantined after
    ``max_resurrections`` crashes (relier: not lost, in the DLQ); and how many messages wait in
    kombu's ``unacked`` hash (vanilla: taken by a killed worker and not acked, prefetched ones
    and some that ran before the ack; redelivered only after ``visibility_timeout``)."""
    r = h.reset()
    app = Celery("pub", broker=h.url, set_as_current=False)
    rng = random.Random(seed)
    fleet = [h.worker(relier, "ch", concurrency=2) for _ in range(2)]
    done = 0
    try:
        with app.producer_or_acquire() as producer:
            for n in range(tasks):
                app.send_task("bench.job", args=(n, rng.uniform(0, 0.005)), producer=producer)
        h.wait_reported(fleet)
        done = kill_each_second(
            r, fleet, tasks, kills, rng, partial(h.worker, relier, "ch", concurrency=2)
        )
        settle(r, partial(_settled, r), tasks, still, time.monotonic() + 600)
        ended = {int(x) for x in r.smembers("bench:ended")}
        twice = sum(1 for n in ended if int(r.get(f"bench:runs:{n}") or 0) > 1)
        quarantined = int(r.hlen(DLQ))
        unacked = int(r.hlen(UNACKED))
    finally:
        kill_all(fleet)
        app.close()
    if not relier:
        h.check_vanilla("delivery under SIGKILL chaos", fleet)
    return {
        "kills": done,
        "delivered": len(ended),
        "lost": tasks - len(ended) - quarantined,
        "ran_twice": twice,
        "quarantined": quarantined,
        "in_kombu_unacked": unacked,
    }


def _settled(r: redis.Redis) -> int:
    """Tasks that ran to the end, or were quarantined after max_resurrections crashes."""
    return int(r.scard("bench:ended")) + int(r.hlen(DLQ))


def _all_started(r: redis.Redis, w: WorkerProcess, ids: list[int]) -> bool:
    return running(w) and all(starts(r, n) for n in ids)


def recovery(
    h: Harness, relier: bool, kills: int, per_kill: int, wait: float, hold: float = 10.0
) -> dict[str, Any]:
    """Seconds from the SIGKILL of a worker to each of its running tasks starting again on an
    idle survivor (so queueing behind other work does not count), at default settings. Each
    task holds its process ``hold`` s, long enough to be running when the survivor is up (3 s
    was not, on a loaded machine: a slow survivor start let every task end before the kill). The
    vanilla side runs with ``task_acks_late`` (its best case: without it a killed worker's
    tasks are gone); a task not running again within ``wait`` s is not recovered."""
    r = h.reset()
    app = Celery("pub", broker=h.url, set_as_current=False)
    conf = None if relier else {"task_acks_late": True}
    delays: list[float] = []
    held = 0
    workers: list[WorkerProcess] = []
    try:
        for k in range(kills):
            victim = h.worker(relier, "victim", concurrency=per_kill, conf=conf)
            workers.append(victim)
            h.wait_reported([victim])
            ids = [k * 1000 + i for i in range(per_kill)]
            for n in ids:
                app.send_task("bench.hold", args=(n, hold))
            wait_until(
                partial(_all_started, r, victim, ids),
                60,
                f"{per_kill} tasks to start on {victim.hostname}",
            )
            survivor = h.worker(relier, "survivor", concurrency=per_kill, conf=conf)
            workers.append(survivor)
            h.wait_reported([survivor])
            killed = time.time()
            victim.kill(signal.SIGKILL)
            held += len(ids)
            end = time.monotonic() + wait
            while time.monotonic() < end and not all(len(starts(r, n)) >= 2 for n in ids):
                time.sleep(0.02)
            delays += [s[1][0] - killed for n in ids if len(s := starts(r, n)) >= 2]
            # Stop taking work at once, so the next round's tasks start on its own victim.
            terminate(survivor)
    finally:
        kill_all(workers)
        app.close()
    if not relier:
        h.check_vanilla("recovery", workers)
    return {"tasks": held, "recovered": len(delays), "within_s": wait, **pcts(delays, 2)}
