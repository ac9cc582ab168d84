"""Recovery on RabbitMQ: vanilla Celery with acks_late against Celery + relier, same run.

    python benchmarks/bench_rabbitmq.py [--kills 5] [--per-kill 4] [--amqp URL] [--pin] [--warm N]

RabbitMQ gives a dead consumer's unacknowledged messages back at once; vanilla Celery with
``task_acks_late`` runs them again as soon as another worker takes them. Relier must be no
slower (issue 17): a redelivery whose holder is gone (its presence connection closed) is taken
over at once, not dropped until the holder's lease runs out. Each round starts a victim worker
running ``--per-kill`` tasks (held ``HOLD`` s) and an idle survivor, SIGKILLs the victim, and
measures from the moment the SIGKILL is sent to each task starting again; and, as a second
figure, from the moment the victim was reaped (the kernel had closed its sockets by then: the
time a process takes to die is left out). The two sides alternate round by round, so that a
load that drifts during the run weighs on both alike. The vanilla side is checked as in
bench_core.py (no relier log line, bootstep or key). Relier's state is in a throwaway Redis;
the broker is RabbitMQ, with a queue of the run's own. A benchmark, not a test: it prints
figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from celery import Celery
from kombu import Connection
from stats import pct, ratio_interval

from relier_celery.bench.harness import Harness
from relier_celery.testing import RedisServer, WorkerProcess, wait_for

# Long enough that the victim still runs its tasks when the survivor is ready, on a loaded
# machine too (6 s was not: a survivor slow to start let the tasks end before the kill, and the
# round waited in vain). Free: the survivor is SIGKILLed as soon as the tasks started again.
HOLD = 20.0


# --pin: the victim on one CPU, the survivor on another (None: both wherever the kernel puts
# them). All on one machine, a dying victim takes CPU time its survivor needs; in a fleet it
# dies on another machine. RabbitMQ and Redis are left where they are.
PIN: dict[str, int] | None = None

# --warm: before the kill, the survivor runs this many short tasks of its own (sent to its
# direct queue, Celery's worker_direct), as a worker of a fleet has done before one of its
# peers dies. 0: the survivor is fresh, and the first task each of its pool processes runs is
# also its first ever (several ms of CPU a process, on both sides: docs/rabbitmq-recovery.md).
WARM = 0


def worker(h: Harness, amqp: str, queue: str, relier: bool, name: str, n: int) -> WorkerProcess:
    return h.worker(
        relier,
        name,
        concurrency=n,
        quiet=False,
        conf={"task_acks_late": True, "worker_direct": WARM > 0},
        env={"BENCH_BROKER": amqp, "BENCH_QUEUE": queue},
    )


def children(pid: int) -> list[int]:
    """The pids of a process's children (a worker's pool processes)."""
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def pin(w: WorkerProcess, role: str) -> None:
    """With --pin, move a started worker (its main process and its pool's) to its CPU."""
    if PIN is None:
        return
    for pid in [w.pid, *children(w.pid)]:
        os.sched_setaffinity(pid, {PIN[role]})


def warm(h: Harness, app: Celery, w: WorkerProcess) -> None:
    """With --warm, have ``w`` run WARM short tasks, each pool process some, and wait until
    it ran them all."""
    if not WARM:
        return
    r = h.client()
    for _ in range(WARM):
        app.send_task("bench.noop", exchange="C.dq2", routing_key=w.hostname)
    wait_for(lambda: int(r.get("bench:count") or 0) >= WARM, 60, what="the warm-up tasks")
    r.delete("bench:count", "bench:first", "bench:last")
    time.sleep(0.2)  # its pool processes back to waiting for work


def start_round(
    h: Harness, app: Celery, amqp: str, queue: str, relier: bool, ids: list[int]
) -> tuple[WorkerProcess, WorkerProcess]:
    """A victim running one ``bench.hold`` task per id, and an idle survivor (pinned and
    warmed as the options say), both ready: the moment before the kill."""
    side = "relier" if relier else "vanilla"
    r = h.client()
    victim = worker(h, amqp, queue, relier, f"{side}-victim", len(ids))
    try:
        h.wait_reported([victim], 60)
        pin(victim, "victim")
        for n in ids:
            app.send_task("bench.hold", args=(n, HOLD))
        wait_for(lambda: all(r.llen(f"bench:starts:{n}") for n in ids), 60)
        survivor = worker(h, amqp, queue, relier, f"{side}-survivor", len(ids))
    except BaseException:
        victim.stop(timeout=0)
        raise
    try:
        h.wait_reported([survivor], 60)
        pin(survivor, "survivor")
        warm(h, app, survivor)
    except BaseException:
        victim.stop(timeout=0)
        survivor.stop(timeout=0)
        raise
    return victim, survivor


def drop_queue(amqp: str, queue: str) -> None:
    """Delete a run's queue, and the exchanges Celery declared for it."""
    with Connection(amqp) as conn:
        conn.default_channel.queue_delete(queue)
        for exchange in (queue, f"{queue}.control.pidbox"):
            conn.default_channel.exchange_delete(exchange)


def recovery(
    h: Harness, amqp: str, relier: bool, kills: int, per_kill: int
) -> tuple[list[float], list[float]]:
    """Seconds from each SIGKILL to each of the victim's running tasks starting again; and the
    same from the moment the victim was reaped (gone, its sockets closed), the origin of the
    figures measured before 2026-12-06."""
    r = h.reset()
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    app = Celery("pub", broker=amqp)
    app.conf.task_default_queue = queue
    delays: list[float] = []
    after_reap: list[float] = []
    workers: list[WorkerProcess] = []

    def starts(n: int) -> list[float]:
        return [float(x.split("|", 1)[0]) for x in r.lrange(f"bench:starts:{n}", 0, -1)]

    try:
        for k in range(kills):
            ids = [k * 100 + i for i in range(per_kill)]
            victim, survivor = start_round(h, app, amqp, queue, relier, ids)
            workers += [victim, survivor]
            killed = time.time()
            victim.kill(signal.SIGKILL)  # returns once the victim is reaped
            reaped = time.time()
            first = min(starts(n)[0] for n in ids)
            if killed - first >= HOLD:
                raise RuntimeError(
                    f"the victim's tasks had ended {killed - first - HOLD:.1f} s before the kill "
                    "(the survivor was slow to start): nothing to recover; raise HOLD"
                )
            wait_for(lambda ids=ids: all(len(starts(n)) >= 2 for n in ids), 60, interval=0.01)
            delays += [starts(n)[1] - killed for n in ids]
            after_reap += [starts(n)[1] - reaped for n in ids]
            survivor.kill(signal.SIGKILL)  # the round is measured; its tasks are not needed
            if not relier:
                h.check_vanilla(f"rabbitmq recovery round {k}", [victim, survivor])
            time.sleep(0.5)  # RabbitMQ requeues what the survivor held: the next round starts empty
            with Connection(amqp) as conn:
                conn.default_channel.queue_purge(queue)
            r = h.reset()
        return delays, after_reap
    finally:
        for w in workers:  # a failed round leaves none behind
            w.stop(timeout=0)
        app.close()
        drop_queue(amqp, queue)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--per-kill", type=int, default=4)
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672//")
    parser.add_argument(
        "--pin", action="store_true", help="victim and survivor on different CPUs (a fleet)"
    )
    parser.add_argument(
        "--warm",
        type=int,
        default=0,
        metavar="N",
        help="the survivor runs N short tasks before the kill (a fleet's workers are warm)",
    )
    args = parser.parse_args()
    global PIN, WARM
    WARM = args.warm
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            parser.error("--pin needs two CPUs")
        PIN = {"victim": cpus[1], "survivor": cpus[0]}
    logs = tempfile.mkdtemp(prefix="bench-rmq-")
    with RedisServer() as url:
        h = Harness(url, Path(logs))
        vanilla: list[float] = []
        vanilla_reaped: list[float] = []
        relier: list[float] = []
        relier_reaped: list[float] = []
        rounds: dict[bool, list[list[float]]] = {False: [], True: []}  # each kill's delays
        try:
            # Alternating, the first side swapping each round.
            for k in range(args.kills):
                for side in (False, True) if k % 2 == 0 else (True, False):
                    delays, reaped = recovery(h, args.amqp, side, 1, args.per_kill)
                    (relier if side else vanilla).extend(delays)
                    rounds[side].append(delays)
                    (relier_reaped if side else vanilla_reaped).extend(reaped)
        except Exception:
            print(f"failed: the workers' logs are kept in {logs}")
            raise
    shutil.rmtree(logs)
    for name, delays, reaped in (
        ("vanilla acks_late", vanilla, vanilla_reaped),
        ("relier", relier, relier_reaped),
    ):
        print(
            f"{name:>17}: kill -> running again p50 {statistics.median(delays):.3f} s, "
            f"p99 {pct(delays, 99):.3f} s, max {max(delays):.3f} s ({len(delays)} tasks); "
            f"from the reaping p50 {statistics.median(reaped):.3f} s, "
            f"p99 {pct(reaped, 99):.3f} s"
        )
    ratio = statistics.median(relier) / statistics.median(vanilla)
    layout = "victim and survivor on any CPU"
    if PIN is not None:
        layout = f"victim on CPU {PIN['victim']}, survivor on CPU {PIN['survivor']}"
    layout += f"; survivor warmed by {WARM} tasks" if WARM else "; survivor fresh"
    low, high = ratio_interval(rounds[True], rounds[False])
    print(
        f"relier / vanilla p50: {ratio:.2f}x (goal: no slower; 95% interval {low:.2f}x to "
        f"{high:.2f}x, resampling the kills); {layout}"
    )
    print(h.proof()["summary"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
