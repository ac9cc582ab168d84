"""Benchmark of the zero-loss core: vanilla Celery vs Celery + relier, same run, same Redis.

    python benchmarks/bench_core.py [--tasks 3000] [--latency-samples 300] [--kills 3]
                                    [--vanilla-venv PATH|auto] [--chaos-tasks 10000]
                                    [--backlog-tasks 200] [--key-tasks 5000]

``rl bench all`` (relier_celery/bench/) is the packaged, shorter form of this benchmark; both
use the same app (relier_celery/bench/worker_app/bench_app.py) and the same pieces.
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
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

from celery import Celery
from stats import pct

from relier_celery.bench.delivery import DLQ, chaos_loss, recovery, starts
from relier_celery.bench.harness import Harness, kill_all, running
from relier_celery.bench.overhead import overhead
from relier_celery.core.errors import BenchError
from relier_celery.testing import RedisServer, wait_for

HERE = Path(__file__).parent


def recovery_under_load(
    h: Harness, tasks: int, kill_every: float, quarantined: list[int]
) -> list[float]:
    """Seconds from the SIGKILL of a whole worker to each task it was running starting again,
    with a backlog deeper than the fleet (two workers of two slots draining ``tasks`` jobs of
    0.1-1.5 s, a worker killed every ``kill_every`` s and replaced at once), at defaults.
    ``quarantined[0]`` is set to the tasks that reached the DLQ instead (every kill counts as a
    crash of each task the worker held, prefetched ones too: max_resurrections)."""
    r = h.reset()
    app = Celery("pub", broker=h.url)
    rng = random.Random(4)
    fleet = [h.worker(True, "bk", concurrency=2, quiet=False) for _ in range(2)]
    h.wait_reported(fleet, 60)
    delays: list[float] = []
    pending: list[tuple[float, list[int]]] = []
    try:
        with app.producer_or_acquire() as producer:
            for n in range(tasks):
                app.send_task("bench.job", args=(n, rng.uniform(0.1, 1.5)), producer=producer)
        deadline = time.monotonic() + 600

        def settled() -> int:  # ran to the end, or quarantined after max_resurrections crashes
            return int(r.scard("bench:ended")) + int(r.hlen(DLQ))

        while settled() < tasks and time.monotonic() < deadline:
            time.sleep(kill_every)
            victim = rng.choice([w for w in fleet if w.proc is not None and w.proc.poll() is None])
            ended = {int(x) for x in r.smembers("bench:ended")}
            running_on = [
                n
                for n in range(tasks)
                if n not in ended and (s := starts(r, n)) and s[-1][1] == victim.hostname
            ]
            victim.kill(signal.SIGKILL)
            pending.append((time.time(), running_on))
            fleet.append(h.worker(True, "bk", concurrency=2, quiet=False))
        wait_for(lambda: settled() >= tasks, 300, interval=0.2)
        quarantined[0] = int(r.hlen(DLQ))
        for killed_at, ns in pending:
            for n in ns:
                later = [at for at, _ in starts(r, n) if at > killed_at]
                if later:
                    delays.append(min(later) - killed_at)
        return delays
    finally:
        kill_all(fleet)
        app.close()


def keys_after(h: Harness, tasks: int, wait: float) -> dict[str, int]:
    """Relier's keys ``wait`` s after ``tasks`` completed tasks, the worker still running, by
    kind (the key name without its worker or task suffix)."""
    r = h.reset()
    app = Celery("pub", broker=h.url)
    w = h.worker(True, "keys", concurrency=2)
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
        kill_all([w])
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
        vanilla_python = str(python)
    else:
        vanilla_python = None
    try:
        with RedisServer() as url, tempfile.TemporaryDirectory(prefix="relier-bench-") as logs:
            report(Harness(url, Path(logs), vanilla_python=vanilla_python), args)
    except BenchError as exc:
        raise SystemExit(str(exc)) from None
    return 0


def report(h: Harness, args: argparse.Namespace) -> None:
    print(
        f"Redis: throwaway redis-server at {h.url}; prefork concurrency 2 for throughput, "
        "solo for latency",
        flush=True,
    )
    # Interleaved rounds, median of each: a 2-core machine is noisy.
    o = overhead(h, args.tasks, args.rounds, args.latency_samples)
    tp, lat = o["throughput"], o["latency"]
    print(
        f"no-op throughput: vanilla {tp['vanilla_per_s']:.0f}/s, relier {tp['relier_per_s']:.0f}"
        f"/s, ratio {tp['ratio']:.2f} (goal >= 1.0)",
        flush=True,
    )
    print(
        f"latency p50: vanilla {lat['vanilla_p50_ms']:.2f} ms, relier {lat['relier_p50_ms']:.2f}"
        f" ms, added {lat['added_p50_ms']:+.2f} ms (goal <= 0.3 ms); p99: vanilla "
        f"{lat['vanilla_p99_ms']:.2f} ms, relier {lat['relier_p99_ms']:.2f} ms",
        flush=True,
    )
    print(h.proof()["summary"], flush=True)
    kinds = keys_after(h, args.key_tasks, 15.0)
    print(
        f"relier keys 15 s after {args.key_tasks} completed tasks (worker running): "
        f"{sum(kinds.values())} ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))})",
        flush=True,
    )
    if args.chaos_tasks:
        for side in (False, True):
            c = chaos_loss(h, side, args.chaos_tasks, args.chaos_kills, still=15.0)
            print(
                f"chaos, {'relier' if side else 'vanilla'}: {args.chaos_tasks} tasks of "
                f"0-5 ms, {c['kills']} whole-worker SIGKILLs (one a second): {c['lost']} lost, "
                f"{c['ran_twice']} ran twice, {c['quarantined']} quarantined",
                flush=True,
            )
    if args.backlog_tasks:
        quarantined = [0]
        delays = recovery_under_load(h, args.backlog_tasks, 4.0, quarantined)
        print(
            f"recovery under load ({len(delays)} tasks running on killed workers, backlog of "
            f"{args.backlog_tasks} jobs of 0.1-1.5 s, a worker killed every 4 s, "
            f"{quarantined[0]} quarantined after max_resurrections): p50 "
            f"{pct(delays, 50):.2f} s, p99 {pct(delays, 99):.2f} s, max "
            f"{max(delays, default=0):.2f} s (goal p50 <= 5 s, p99 <= 10 s)",
            flush=True,
        )
    rec = recovery(h, True, args.kills, per_kill=2, wait=60.0)
    if rec["recovered"]:
        print(
            f"recovery after SIGKILL ({rec['recovered']} tasks, default lease 4 s, scan 1 s): "
            f"p50 {rec['p50']:.2f} s, p99 {rec['p99']:.2f} s, max {rec['max']:.2f} s "
            "(goal p50 <= 5 s, p99 <= 10 s)",
            flush=True,
        )
    else:
        print("recovery: no task was caught running on a killed worker", flush=True)


if __name__ == "__main__":
    sys.exit(main())
