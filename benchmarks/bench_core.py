"""Benchmark of the zero-loss core: vanilla Celery vs Celery + relier, same run, same Redis.

    python benchmarks/bench_core.py [--tasks 3000] [--latency-samples 300] [--kills 3]

Prints: no-op throughput of each and the ratio (goal >= 0.9), end-to-end latency p50/p99 of
each and the difference (goal < 1 ms added at p50), and the time from a SIGKILL to the task
running again on another worker, at default settings (goal p50 <= 5 s, p99 <= 10 s).
A benchmark, not a test: it prints figures and never fails on them.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import redis
from celery import Celery
from stats import pct

from relier_celery.testing import RedisServer, WorkerProcess, wait_for

HERE = Path(__file__).parent


def worker(
    url: str,
    relier: bool,
    name: str,
    pool: str = "prefork",
    concurrency: int = 2,
    quiet: bool = True,
) -> WorkerProcess:
    """A worker; ``quiet`` logs warnings only, so per-task log lines do not dilute overhead."""
    env = {
        "BENCH_REDIS": url,
        "BENCH_RELIER": "1" if relier else "0",
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    w = WorkerProcess(
        "bench_app",
        pool=pool,
        concurrency=concurrency,
        hostname=f"{name}@%h",
        env=env,
        cwd=str(HERE),
        extra=["--loglevel", "WARNING"] if quiet else [],
    )
    return w


def throughput(url: str, relier: bool, tasks: int) -> float:
    """Tasks per second draining a pre-filled queue of no-op tasks."""
    r = redis.Redis.from_url(url)
    r.flushall()
    app = Celery("pub", broker=url)
    with app.producer_or_acquire() as producer:
        for _ in range(tasks):
            app.send_task("bench.noop", producer=producer)
    w = worker(url, relier, "tp", concurrency=2).start()
    try:
        # Measured from the first execution to the last, so worker start-up does not count.
        wait_for(lambda: int(r.get("bench:count") or 0) >= tasks, 600, interval=0.01)
        return (tasks - 1) / (float(r.get("bench:last")) - float(r.get("bench:first")))
    finally:
        w.stop()
        app.close()


def latency(url: str, relier: bool, samples: int) -> list[float]:
    """End-to-end latency of one task at a time (publish -> task body runs), in ms."""
    r = redis.Redis.from_url(url)
    r.flushall()
    app = Celery("pub", broker=url)
    w = worker(url, relier, "lat", pool="solo", concurrency=1).start()
    try:
        with app.producer_or_acquire() as producer:
            for i in range(samples + 20):
                app.send_task("bench.echo", args=(time.time(),), producer=producer)
                wait_for(lambda i=i: r.llen("bench:latency") > i, 30, interval=0.0002)
        values = [float(x) * 1000 for x in r.lrange("bench:latency", 20, -1)]
        return values
    finally:
        w.stop()
        app.close()


def recovery(url: str, kills: int, per_kill: int) -> list[float]:
    """Seconds from the SIGKILL of a worker to each of its running tasks starting again on an
    idle survivor (so queueing behind other work does not count)."""
    r = redis.Redis.from_url(url, decode_responses=True)
    r.flushall()
    app = Celery("pub", broker=url)
    delays: list[float] = []

    def starts(n: int) -> list[float]:
        return [float(x.split("|", 1)[0]) for x in r.lrange(f"bench:starts:{n}", 0, -1)]

    try:
        for k in range(kills):
            victim = worker(url, True, f"victim{k}", concurrency=per_kill, quiet=False).start()
            victim.wait_ready(60)
            ids = [k * 100 + i for i in range(per_kill)]
            for n in ids:
                app.send_task("bench.hold", args=(n, 1.0))
            wait_for(lambda ids=ids: all(starts(n) for n in ids), 60)
            survivor = worker(url, True, f"survivor{k}", concurrency=per_kill, quiet=False)
            survivor.start().wait_ready(60)
            victim.kill(signal.SIGKILL)
            killed = time.time()
            wait_for(lambda ids=ids: all(len(starts(n)) >= 2 for n in ids), 60, interval=0.02)
            delays += [starts(n)[1] - killed for n in ids]
            survivor.stop()
        return delays
    finally:
        app.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--latency-samples", type=int, default=300)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds per side")
    args = parser.parse_args()
    with RedisServer() as url:
        print(
            f"Redis: throwaway redis-server at {url}; prefork concurrency 2 for throughput, "
            "solo for latency",
            flush=True,
        )
        # Interleaved rounds, median of each: a 2-core machine is noisy.
        # The order alternates so that neither side always runs on a warmer machine.
        rounds = []
        for i in range(args.rounds):
            if i % 2:
                relier_first = throughput(url, True, args.tasks)
                rounds.append((throughput(url, False, args.tasks), relier_first))
            else:
                vanilla_first = throughput(url, False, args.tasks)
                rounds.append((vanilla_first, throughput(url, True, args.tasks)))
        tp_vanilla = statistics.median(v for v, _ in rounds)
        tp_relier = statistics.median(x for _, x in rounds)
        print(
            f"no-op throughput: vanilla {tp_vanilla:.0f}/s, relier {tp_relier:.0f}/s, "
            f"ratio {tp_relier / tp_vanilla:.2f} (goal >= 0.9)",
            flush=True,
        )
        lat_vanilla = latency(url, False, args.latency_samples)
        lat_relier = latency(url, True, args.latency_samples)
        p50v, p50r = statistics.median(lat_vanilla), statistics.median(lat_relier)
        print(
            f"latency p50: vanilla {p50v:.2f} ms, relier {p50r:.2f} ms, added "
            f"{p50r - p50v:+.2f} ms (goal < 1 ms); p99: vanilla {pct(lat_vanilla, 99):.2f} ms,"
            f" relier {pct(lat_relier, 99):.2f} ms",
            flush=True,
        )
        delays = recovery(url, args.kills, per_kill=2)
        if delays:
            print(
                f"recovery after SIGKILL ({len(delays)} tasks, default lease 4 s, scan 1 s): "
                f"p50 {pct(delays, 50):.2f} s, p99 {pct(delays, 99):.2f} s, max "
                f"{max(delays):.2f} s (goal p50 <= 5 s, p99 <= 10 s)",
                flush=True,
            )
        else:
            print("recovery: no task was caught running on a killed worker", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
