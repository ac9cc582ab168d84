"""Delivery on RabbitMQ under load: vanilla Celery with acks_late against Celery + relier, same run.

    python benchmarks/bench_rabbitmq_load.py [--tasks 3000] [--seconds 0.005] [--kills 10]

bench_rabbitmq.py measures one kill of a worker holding a few tasks, with an idle survivor.
This one measures what a busy fleet sees: a backlog of ``--tasks`` short tasks (0 to
``--seconds`` each) much deeper than the fleet (``--workers`` workers of two processes, prefetch
4 each), one whole worker SIGKILLed every second and replaced at once, until ``--kills`` kills or
the backlog is done. Three workers by default: a worker takes about 1.4 s to start on a 2-vCPU
machine, so with two the other one was often the replacement of the last kill, still starting,
and both sides waited for its start (about 500 ms a kill), not for a recovery. Then it waits
until every task ended, or nothing moved for ``STILL`` s.

Printed per side: the time from the first publish to the last task's end, lost tasks (never
ended), tasks that ended twice (a task that ran to its end but whose ack the SIGKILL beat is
run again by RabbitMQ's redelivery: vanilla does that; relier's completion record must stop
it), the kills done, and the time from each kill to each task the killed worker was running
starting again (recovery under load: RabbitMQ puts those messages back at the head of the
queue, and the survivors have newer work prefetched; use longer tasks, ``--seconds 0.1``, for
that figure: a 5 ms task mostly ends before its pool process is killed). The two sides
alternate run by run. The vanilla side is checked as in bench_core.py (no relier log line,
bootstep or key). A benchmark, not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

from bench_rabbitmq import worker
from celery import Celery
from kombu import Connection
from stats import pct, ratio_interval

from relier_celery.bench.delivery import kill_each_second, restarts
from relier_celery.bench.harness import Harness, kill_all
from relier_celery.testing import RedisServer

# Seconds without a task ending after which a run is over (its missing tasks are lost).
STILL = 20.0


def run(
    h: Harness, amqp: str, relier: bool, tasks: int, seconds: float, kills: int, workers: int
) -> dict[str, Any]:
    r = h.reset()
    queue = f"load-{uuid.uuid4().hex[:8]}"
    app = Celery("pub", broker=amqp, set_as_current=False)
    app.conf.task_default_queue = queue
    rng = random.Random(5)
    side = "relier" if relier else "vanilla"
    replace = partial(worker, h, amqp, queue, relier, f"{side}-load", 2)
    fleet = [replace() for _ in range(workers)]
    done = 0
    try:
        h.wait_reported(fleet, 60)
        start = time.time()
        with app.producer_or_acquire() as producer:
            for n in range(tasks):
                app.send_task("bench.job", args=(n, rng.uniform(0, seconds)), producer=producer)
        killed: dict[str, float] = {}
        done = kill_each_second(r, fleet, tasks, kills, rng, replace, killed)
        last, since, finished = -1, time.monotonic(), time.time()
        while (ended := int(r.scard("bench:ended"))) < tasks and time.monotonic() - since < STILL:
            if ended != last:
                last, since, finished = ended, time.monotonic(), time.time()
            time.sleep(0.02)
        if ended >= tasks:
            finished = time.time()
        twice = sum(1 for n in range(tasks) if int(r.get(f"bench:runs:{n}") or 0) > 1)
        delays = restarts(r, tasks, killed)
        dlq = int(r.hlen("rl:{rl}:dlq")) if relier else 0
    finally:
        kill_all(fleet)
        app.close()
        with Connection(amqp) as conn:
            conn.default_channel.queue_delete(queue)
            for exchange in (queue, f"{queue}.control.pidbox"):
                conn.default_channel.exchange_delete(exchange)
    if not relier:
        h.check_vanilla("rabbitmq load", fleet)
    return {
        "seconds": finished - start,
        "lost": tasks - ended - dlq,
        "in_dlq": dlq,
        "ended_twice": twice,
        "kills": done,
        "restarts": delays,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=0.005)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=3, help="the fleet (2 processes each)")
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672//")
    args = parser.parse_args()
    if args.workers < 2:
        parser.error("--workers must be at least 2: a killed worker's tasks need a survivor")
    if args.tasks < 1 or args.runs < 1 or args.kills < 0 or args.seconds < 0:
        parser.error("--tasks and --runs must be at least 1, --kills and --seconds not negative")
    logs = tempfile.mkdtemp(prefix="bench-rmq-load-")
    results: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    with RedisServer() as url:
        h = Harness(url, Path(logs))
        try:
            for k in range(args.runs):
                for side in (False, True) if k % 2 == 0 else (True, False):
                    out = run(
                        h, args.amqp, side, args.tasks, args.seconds, args.kills, args.workers
                    )
                    shown = {**out, "restarts": sum(map(len, out["restarts"]))}
                    print(f"{'relier' if side else 'vanilla'} run {k}: {shown}", flush=True)
                    results[side].append(out)
        except Exception:
            print(f"failed: the workers' logs are kept in {logs}")
            raise
    shutil.rmtree(logs)
    for side, name in ((False, "vanilla acks_late"), (True, "relier")):
        rs = results[side]
        took = statistics.median(x["seconds"] for x in rs)
        print(
            f"{name:>17}: {args.tasks} tasks in {took:.1f} s "
            f"(median of {len(rs)}), lost {sum(x['lost'] for x in rs)}, "
            f"ended twice {sum(x['ended_twice'] for x in rs)}, "
            f"in the DLQ {sum(x['in_dlq'] for x in rs)}, kills {sum(x['kills'] for x in rs)}"
        )
    for side, name in ((False, "vanilla acks_late"), (True, "relier")):
        delays = [d for x in results[side] for kill in x["restarts"] for d in kill]
        if delays:
            print(
                f"{name:>17}: kill -> a task it was running started again, p50 "
                f"{statistics.median(delays) * 1000:.0f} ms, p99 {pct(delays, 99) * 1000:.0f} ms "
                f"({len(delays)} tasks)"
            )
    ratio = statistics.median(x["seconds"] for x in results[True]) / statistics.median(
        x["seconds"] for x in results[False]
    )
    print(f"relier / vanilla time to drain the backlog: {ratio:.2f}x")
    per_kill = {side: [k for x in results[side] for k in x["restarts"]] for side in results}
    if per_kill[True] and per_kill[False]:
        low, high = ratio_interval(per_kill[True], per_kill[False])
        p50 = statistics.median(d for k in per_kill[True] for d in k) / statistics.median(
            d for k in per_kill[False] for d in k
        )
        print(
            f"relier / vanilla p50 from a kill to a restart under load: {p50:.2f}x "
            f"(95% interval {low:.2f}x to {high:.2f}x, resampling the kills)"
        )
    print(h.proof()["summary"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
