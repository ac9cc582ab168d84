"""Drain on SIGTERM: two workers share a backlog of 2-4 s jobs; the first to run two of them is
sent SIGTERM then (a rolling deploy), and every job is followed to its end. Relier's side
drains with a ``relier_drain_timeout`` shorter than any job, so its running jobs are handed off;
vanilla Celery's warm shutdown waits for its running jobs."""

from __future__ import annotations

import random
import subprocess
import time
from typing import Any

from celery import Celery

from relier_celery.bench.delivery import settle, starts
from relier_celery.bench.harness import Harness, kill_all, terminate
from relier_celery.bench.timing import wait_until
from relier_celery.core.errors import BenchError

__all__ = ["drain"]

# How long the SIGTERMed worker may take to exit before the phase fails.
EXIT_TIMEOUT = 60.0


def drain(
    h: Harness, relier: bool, tasks: int, still: float, drain_timeout: float, seed: int = 7
) -> dict[str, Any]:
    """Lost (never completed by the end of the phase), completed twice, and started again
    elsewhere (handed off), after a SIGTERM to a worker running two jobs of ``tasks``."""
    r = h.reset()
    app = Celery("pub", broker=h.url, set_as_current=False)
    rng = random.Random(seed)
    conf = {"relier_drain_timeout": drain_timeout} if relier else None
    workers = [h.worker(relier, name, concurrency=2, conf=conf) for name in ("term", "next")]
    try:
        h.wait_reported(workers)
        with app.producer_or_acquire() as producer:
            for n in range(tasks):
                app.send_task("bench.job", args=(n, rng.uniform(2.0, 4.0)), producer=producer)

        def busy() -> Any:
            # The first worker to run two jobs is the one sent SIGTERM: which one takes more
            # of the backlog is the fetch's and the machine's choice (in one suite run the
            # worker picked in advance had not run two within 60 s).
            hosts = [s[-1][1] for n in range(tasks) if (s := starts(r, n))]
            return next((w for w in workers if hosts.count(w.hostname) >= 2), None)

        victim = wait_until(busy, 60, "a worker running two jobs", interval=0.01)
        signalled = time.monotonic()
        terminate(victim)
        assert victim.proc is not None
        try:
            victim.proc.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise BenchError(
                f"{victim.hostname} did not exit within {EXIT_TIMEOUT:g} s of SIGTERM"
            ) from None
        exit_s = time.monotonic() - signalled
        settle(r, lambda: r.scard("bench:ended"), tasks, still, time.monotonic() + 300)
        ended = {int(x) for x in r.smembers("bench:ended")}
        twice = sum(1 for n in ended if int(r.get(f"bench:runs:{n}") or 0) > 1)
        restarted = sum(1 for n in range(tasks) if len(starts(r, n)) > 1)
    finally:
        kill_all(workers)
        app.close()
    if not relier:
        h.check_vanilla("drain on SIGTERM", workers)
    return {
        "lost": tasks - len(ended),
        "completed_twice": twice,
        "started_again": restarted,
        "exit_s": round(exit_s, 2),
    }
