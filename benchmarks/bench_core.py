"""Benchmark of the zero-loss core: vanilla Celery vs Celery + relier, same run, same Redis.

    python benchmarks/bench_core.py [--tasks 3000] [--latency-samples 300] [--kills 3]
                                    [--vanilla-venv PATH|auto] [--chaos-tasks 10000]
                                    [--backlog-tasks 200] [--key-tasks 5000]

The vanilla side is the same app without ``relier_celery`` in ``imports``; with
``--vanilla-venv`` its workers run from a virtualenv where relier is not installed at all
(``auto`` creates one, ``benchmarks/.vanilla-venv``, with the installed versions of celery,
kombu, billiard and redis). After each vanilla phase the benchmark
checks that the worker logged no relier line, had no relier bootstep and left no relier key in
Redis, prints how it knows, and stops if any is found: such figures would compare relier
with relier.
Prints: no-op throughput of each and the ratio (goal >= 1.0), end-to-end latency p50/p99 of
each and the difference (goal <= 0.3 ms added at p50); relier's keys 15 s after 5,000 completed
tasks (goal: a handful, none per task); lost and repeated tasks of each side under a
whole-worker SIGKILL every second (10,000 tasks of 0-5 ms); the time from a SIGKILL to each
running task starting again with a backlog deeper than the fleet, and on an idle worker, at
default settings (goal p50 <= 5 s, p99 <= 10 s).
A benchmark, not a test: it prints figures and never fails on them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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


def _starts(r: redis.Redis, n: int) -> list[tuple[float, str]]:
    out = []
    for x in r.lrange(f"bench:starts:{n}", 0, -1):
        at, host = x.split("|", 1)
        out.append((float(at), host))
    return out


def recovery_under_load(
    url: str, tasks: int, kill_every: float, quarantined: list[int]
) -> list[float]:
    """Seconds from the SIGKILL of a whole worker to each task it was running starting again,
    with a backlog deeper than the fleet (two workers of two slots draining ``tasks`` jobs of
    0.1-1.5 s, a worker killed every ``kill_every`` s and replaced at once), at defaults.
    ``quarantined[0]`` is set to the tasks that reached the DLQ instead (every kill counts as a
    crash of each task the worker held, prefetched ones too: max_resurrections)."""
    r = redis.Redis.from_url(url, decode_responses=True)
    r.flushall()
    app = Celery("pub", broker=url)
    rng = random.Random(4)
    fleet = [worker(url, True, f"bk{i}", concurrency=2, quiet=False).start() for i in range(2)]
    for w in fleet:
        w.wait_ready(60)
    delays: list[float] = []
    pending: list[tuple[float, list[int]]] = []
    try:
        with app.producer_or_acquire() as producer:
            for n in range(tasks):
                app.send_task("bench.job", args=(n, rng.uniform(0.1, 1.5)), producer=producer)
        deadline = time.monotonic() + 600
        n_workers = 2

        def settled() -> int:  # ran to the end, or quarantined after max_resurrections crashes
            return int(r.scard("bench:ended")) + int(r.hlen("rl:{rl}:dlq"))

        while settled() < tasks and time.monotonic() < deadline:
            time.sleep(kill_every)
            victim = rng.choice([w for w in fleet if w.proc is not None and w.proc.poll() is None])
            host = victim.hostname.split("@")[0]
            ended = {int(x) for x in r.smembers("bench:ended")}
            running_on = [
                n
                for n in range(tasks)
                if n not in ended and (s := _starts(r, n)) and s[-1][1].startswith(host)
            ]
            victim.kill(signal.SIGKILL)
            pending.append((time.time(), running_on))
            n_workers += 1
            fleet.append(worker(url, True, f"bk{n_workers}", concurrency=2, quiet=False).start())
        wait_for(lambda: settled() >= tasks, 300, interval=0.2)
        quarantined[0] = int(r.hlen("rl:{rl}:dlq"))
        for killed_at, ns in pending:
            for n in ns:
                later = [at for at, _ in _starts(r, n) if at > killed_at]
                if later:
                    delays.append(min(later) - killed_at)
        return delays
    finally:
        for w in fleet:
            w.stop(timeout=10)
        app.close()


def chaos_loss(url: str, relier: bool, tasks: int, kills: int) -> tuple[int, int, int]:
    """``tasks`` short tasks (0-5 ms) on two workers of two slots, one whole worker SIGKILLed
    every second and replaced: (tasks that never ran, tasks that ran twice or more, kills)."""
    r = redis.Redis.from_url(url, decode_responses=True)
    r.flushall()
    app = Celery("pub", broker=url)
    rng = random.Random(5)
    fleet = [worker(url, relier, f"ch{i}", concurrency=2).start() for i in range(2)]
    done = 0
    try:
        with app.producer_or_acquire() as producer:
            for n in range(tasks):
                app.send_task("bench.job", args=(n, rng.uniform(0, 0.005)), producer=producer)
        for k in range(kills):
            time.sleep(1.0)
            if r.scard("bench:ended") >= tasks:
                break
            alive = [w for w in fleet if w.proc is not None and w.proc.poll() is None]
            rng.choice(alive).kill(signal.SIGKILL)
            done = k + 1
            fleet.append(worker(url, relier, f"ch{k + 2}", concurrency=2).start())
        # Then wait until nothing more completes (vanilla loses what it had taken)
        last, still = -1, 0.0
        while still < 15 and r.scard("bench:ended") < tasks:
            now = r.scard("bench:ended")
            still = still + 0.5 if now == last else 0.0
            last = now
            time.sleep(0.5)
        ended = {int(x) for x in r.smembers("bench:ended")}
        twice = sum(1 for n in ended if int(r.get(f"bench:runs:{n}") or 0) > 1)
        return tasks - len(ended), twice, done
    finally:
        for w in fleet:
            w.stop(timeout=10)
        app.close()


def keys_after(url: str, tasks: int, wait: float) -> dict[str, int]:
    """Relier's keys ``wait`` s after ``tasks`` completed tasks, the worker still running, by
    kind (the key name without its worker or task suffix)."""
    r = redis.Redis.from_url(url, decode_responses=True)
    r.flushall()
    app = Celery("pub", broker=url)
    w = worker(url, True, "keys", concurrency=2).start()
    try:
        with app.producer_or_acquire() as producer:
            for _ in range(tasks):
                app.send_task("bench.noop", producer=producer)
        wait_for(lambda: running(w) and int(r.get("bench:count") or 0) >= tasks, 600, interval=0.05)
        time.sleep(wait)
        kinds: dict[str, int] = {}
        for key in r.scan_iter("rl:*"):
            kind = ":".join(key.split(":")[:3])
            kinds[kind] = kinds.get(kind, 0) + 1
        return kinds
    finally:
        w.stop()
        app.close()


def vanilla_venv(path: Path) -> Path:
    """A virtualenv with this environment's celery, kombu, billiard and redis, and no relier."""
    from importlib.metadata import version

    python = path / "bin" / "python"
    if not python.exists():
        import subprocess
        import venv

        print(f"creating {path} (vanilla Celery, relier not installed)", flush=True)
        venv.EnvBuilder(with_pip=True).create(path)
        pins = [f"{p}=={version(p)}" for p in ("celery", "kombu", "billiard", "redis")]
        # kombu's Redis transport imports packaging without declaring it.
        subprocess.run([python, "-m", "pip", "install", "-q", *pins, "packaging"], check=True)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--latency-samples", type=int, default=300)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds per side")
    parser.add_argument("--key-tasks", type=int, default=5000)
    parser.add_argument("--backlog-tasks", type=int, default=200, help="0 skips it")
    parser.add_argument("--chaos-tasks", type=int, default=10000, help="0 skips it")
    parser.add_argument("--chaos-kills", type=int, default=30)
    parser.add_argument(
        "--vanilla-venv",
        type=Path,
        help="run the vanilla workers with PATH/bin/python, a virtualenv without relier",
    )
    args = parser.parse_args()
    if str(args.vanilla_venv) == "auto":
        args.vanilla_venv = vanilla_venv(HERE / ".vanilla-venv")
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
            f"ratio {tp_relier / tp_vanilla:.2f} (goal >= 1.0)",
            flush=True,
        )
        lat_vanilla = latency(url, False, args.latency_samples, checks)
        lat_relier = latency(url, True, args.latency_samples, checks)
        p50v, p50r = statistics.median(lat_vanilla), statistics.median(lat_relier)
        print(
            f"latency p50: vanilla {p50v:.2f} ms, relier {p50r:.2f} ms, added "
            f"{p50r - p50v:+.2f} ms (goal <= 0.3 ms); p99: vanilla {pct(lat_vanilla, 99):.2f} ms,"
            f" relier {pct(lat_relier, 99):.2f} ms",
            flush=True,
        )
        print(vanilla_summary(checks), flush=True)
        kinds = keys_after(url, args.key_tasks, 15.0)
        print(
            f"relier keys 15 s after {args.key_tasks} completed tasks (worker running): "
            f"{sum(kinds.values())} ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))})",
            flush=True,
        )
        if args.chaos_tasks:
            for side in (False, True):
                lost, twice, kills = chaos_loss(url, side, args.chaos_tasks, args.chaos_kills)
                print(
                    f"chaos, {'relier' if side else 'vanilla'}: {args.chaos_tasks} tasks of "
                    f"0-5 ms, {kills} whole-worker SIGKILLs (one a second): {lost} lost, "
                    f"{twice} ran twice",
                    flush=True,
                )
        if args.backlog_tasks:
            quarantined = [0]
            delays = recovery_under_load(url, args.backlog_tasks, 4.0, quarantined)
            print(
                f"recovery under load ({len(delays)} tasks running on killed workers, backlog of "
                f"{args.backlog_tasks} jobs of 0.1-1.5 s, a worker killed every 4 s, "
                f"{quarantined[0]} quarantined after max_resurrections): p50 "
                f"{pct(delays, 50):.2f} s, p99 {pct(delays, 99):.2f} s, max "
                f"{max(delays, default=0):.2f} s (goal p50 <= 5 s, p99 <= 10 s)",
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
