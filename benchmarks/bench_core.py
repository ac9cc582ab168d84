"""Benchmark of the zero-loss core: vanilla Celery vs Celery + relier, same run, same Redis.

    python benchmarks/bench_core.py [--tasks 3000] [--latency-samples 300] [--kills 3]
                                    [--vanilla-venv PATH]

The vanilla side is the same app without ``relier_celery`` in ``imports``; with
``--vanilla-venv`` its workers run from a virtualenv where relier is not installed at all
(``pip install celery redis`` of the same versions). After each vanilla phase the benchmark
checks that the worker logged no relier line, had no relier bootstep and left no relier key in
Redis, prints how it knows, and stops if any is found: such figures would compare relier
with relier.
Prints: no-op throughput of each and the ratio (goal >= 0.9), end-to-end latency p50/p99 of
each and the difference (goal < 1 ms added at p50), and the time from a SIGKILL to the task
running again on another worker, at default settings (goal p50 <= 5 s, p99 <= 10 s).
A benchmark, not a test: it prints figures and never fails on them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

import redis
from celery import Celery
from stats import pct

from relier_celery.config import RelierConfig
from relier_celery.testing import RedisServer, WorkerProcess, wait_for

HERE = Path(__file__).parent
# The interpreter of the vanilla workers (--vanilla-venv); None: this one.
VANILLA_PYTHON: dict[str, str | None] = {"value": None}


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
        python=None if relier else VANILLA_PYTHON["value"],
    )
    return w


def running(w: WorkerProcess) -> bool:
    """True while the worker runs; raises with its log's tail if it exited (a worker that fails
    to start must not leave the benchmark waiting for tasks that never run)."""
    if w.proc is not None and w.proc.poll() is not None:
        raise SystemExit(f"worker {w.hostname} exited with {w.proc.returncode}:\n{w.log()[-2000:]}")
    return True


def check_vanilla(url: str, w: WorkerProcess) -> dict[str, object]:
    """After a vanilla phase (worker stopped, Redis not yet flushed): what shows that relier
    did not act. Raises SystemExit if it did. Even a quiet (WARNING) log would show relier's
    start-up warning about the throwaway Redis's AOF."""
    r = redis.Redis.from_url(url, decode_responses=True)
    prefix = RelierConfig.from_app(Celery("probe", broker=url, set_as_current=False)).prefix
    lines = [line for line in w.log().splitlines() if "relier" in line.lower()]
    keys = [k for k in r.keys("*") if k.startswith(f"{prefix}:")]
    ready = json.loads(wait_for(lambda: r.get("bench:bootsteps"), 10, what="bench:bootsteps"))
    steps = [s for s in ready["steps"] if "relier" in s.lower()]
    if lines or keys or steps:
        raise SystemExit(
            f"the vanilla side ran relier ({len(lines)} relier log line(s), bootsteps {steps}, "
            f"{len(keys)} relier key(s)): its figures would compare relier with relier"
        )
    return {"keys": len(keys), "imported": ready["imported"], "phase": w.hostname}


def vanilla_summary(checks: list[dict[str, object]]) -> str:
    imported = sorted({"yes" if c["imported"] else "no" for c in checks})
    where = (
        f"workers run by {VANILLA_PYTHON['value']} (relier not installed)"
        if VANILLA_PYTHON["value"]
        else "workers in this venv, relier installed but not in the app's imports"
    )
    return (
        f"vanilla side ({len(checks)} phases checked): no relier log line, no relier bootstep, "
        f"{sum(int(str(c['keys'])) for c in checks)} relier keys; relier_celery imported by the "
        f"vanilla worker: {'/'.join(imported)}; {where}"
    )


def throughput(url: str, relier: bool, tasks: int, checks: list[dict[str, object]]) -> float:
    """Tasks per second draining a pre-filled queue of no-op tasks; a vanilla phase appends its
    check to ``checks``."""
    r = redis.Redis.from_url(url)
    r.flushall()
    app = Celery("pub", broker=url)
    with app.producer_or_acquire() as producer:
        for _ in range(tasks):
            app.send_task("bench.noop", producer=producer)
    w = worker(url, relier, "tp", concurrency=2).start()
    try:
        # Measured from the first execution to the last, so worker start-up does not count.
        wait_for(lambda: running(w) and int(r.get("bench:count") or 0) >= tasks, 600, interval=0.01)
        rate = (tasks - 1) / (float(r.get("bench:last")) - float(r.get("bench:first")))
    finally:
        w.stop()
        app.close()
    if not relier:
        checks.append(check_vanilla(url, w))
    return rate


def latency(url: str, relier: bool, samples: int, checks: list[dict[str, object]]) -> list[float]:
    """End-to-end latency of one task at a time (publish -> task body runs), in ms; a vanilla
    phase appends its check to ``checks``."""
    r = redis.Redis.from_url(url)
    r.flushall()
    app = Celery("pub", broker=url)
    w = worker(url, relier, "lat", pool="solo", concurrency=1).start()
    try:
        with app.producer_or_acquire() as producer:
            for i in range(samples + 20):
                app.send_task("bench.echo", args=(time.time(),), producer=producer)
                wait_for(
                    lambda i=i: running(w) and r.llen("bench:latency") > i, 30, interval=0.0002
                )
        values = [float(x) * 1000 for x in r.lrange("bench:latency", 20, -1)]
    finally:
        w.stop()
        app.close()
    if not relier:
        checks.append(check_vanilla(url, w))
    return values


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
    parser.add_argument(
        "--vanilla-venv",
        type=Path,
        help="run the vanilla workers with PATH/bin/python, a virtualenv without relier",
    )
    args = parser.parse_args()
    if args.vanilla_venv is not None:
        python = args.vanilla_venv / "bin" / "python"
        if not python.exists():
            parser.error(f"--vanilla-venv: no {python}")
        VANILLA_PYTHON["value"] = str(python)
    checks: list[dict[str, object]] = []
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
                relier_first = throughput(url, True, args.tasks, checks)
                rounds.append((throughput(url, False, args.tasks, checks), relier_first))
            else:
                vanilla_first = throughput(url, False, args.tasks, checks)
                rounds.append((vanilla_first, throughput(url, True, args.tasks, checks)))
        tp_vanilla = statistics.median(v for v, _ in rounds)
        tp_relier = statistics.median(x for _, x in rounds)
        print(
            f"no-op throughput: vanilla {tp_vanilla:.0f}/s, relier {tp_relier:.0f}/s, "
            f"ratio {tp_relier / tp_vanilla:.2f} (goal >= 0.9)",
            flush=True,
        )
        lat_vanilla = latency(url, False, args.latency_samples, checks)
        lat_relier = latency(url, True, args.latency_samples, checks)
        p50v, p50r = statistics.median(lat_vanilla), statistics.median(lat_relier)
        print(
            f"latency p50: vanilla {p50v:.2f} ms, relier {p50r:.2f} ms, added "
            f"{p50r - p50v:+.2f} ms (goal < 1 ms); p99: vanilla {pct(lat_vanilla, 99):.2f} ms,"
            f" relier {pct(lat_relier, 99):.2f} ms",
            flush=True,
        )
        print(vanilla_summary(checks), flush=True)
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
