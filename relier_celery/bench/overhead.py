"""What relier costs per task: no-op throughput of a pre-filled queue, and end-to-end latency
of one task at a time, each side on its own fresh worker over the same Redis."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import redis
from celery import Celery

from relier_celery.bench.harness import Harness, kill_all, running
from relier_celery.bench.timing import wait_until
from relier_celery.observe.summary import percentile
from relier_celery.testing import WorkerProcess

__all__ = ["latency", "overhead", "throughput"]

# Latency samples thrown away first: the worker's and the connection's warm-up.
WARMUP = 20


def throughput(h: Harness, relier: bool, tasks: int, timeout: float = 300) -> float:
    """Tasks per second draining a pre-filled queue of ``tasks`` no-op tasks (prefork, two
    processes), measured from the first execution to the last so start-up does not count."""
    r = h.reset()
    app = Celery("pub", broker=h.url, set_as_current=False)
    with app.producer_or_acquire() as producer:
        for _ in range(tasks):
            app.send_task("bench.noop", producer=producer)
    w = h.worker(relier, "tp", concurrency=2)
    try:
        wait_until(
            lambda: running(w) and int(r.get("bench:count") or 0) >= tasks,
            timeout,
            f"{tasks} no-op tasks",
            interval=0.01,
        )
        rate = (tasks - 1) / (float(r.get("bench:last") or 0) - float(r.get("bench:first") or 0))
    finally:
        kill_all([w])
        app.close()
    if not relier:
        h.check_vanilla("throughput", [w])
    return rate


def latency(h: Harness, relier: bool, samples: int, timeout: float = 30) -> list[float]:
    """End-to-end latency (ms) of one task at a time, publish -> its body runs, on a solo
    worker; the first ``WARMUP`` are not counted."""
    r = h.reset()
    app = Celery("pub", broker=h.url, set_as_current=False)
    w = h.worker(relier, "lat", pool="solo", concurrency=1)
    try:
        h.wait_reported([w])
        with app.producer_or_acquire() as producer:
            for i in range(samples + WARMUP):
                app.send_task("bench.echo", args=(time.time(),), producer=producer)
                wait_until(partial(_sampled, r, w, i), timeout, "a latency sample", interval=0.0002)
        values = [float(x) * 1000 for x in r.lrange("bench:latency", WARMUP, -1)]
    finally:
        kill_all([w])
        app.close()
    if not relier:
        h.check_vanilla("latency", [w])
    return values


def _sampled(r: redis.Redis, w: WorkerProcess, i: int) -> bool:
    return running(w) and int(r.llen("bench:latency")) > i


def overhead(
    h: Harness, tasks: int, rounds: int, samples: int, tick: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Interleaved throughput rounds (median of each side; the order alternates so neither side
    always runs on a warmer machine), then latency of each side."""
    pairs: list[tuple[float, float]] = []
    for i in range(rounds):
        if i % 2:
            rel = throughput(h, True, tasks)
            pairs.append((throughput(h, False, tasks), rel))
        else:
            van = throughput(h, False, tasks)
            pairs.append((van, throughput(h, True, tasks)))
        if tick:
            tick()
    tp_v = statistics.median(v for v, _ in pairs)
    tp_r = statistics.median(x for _, x in pairs)
    lat_v = latency(h, False, samples)
    lat_r = latency(h, True, samples)
    p50_v, p50_r = statistics.median(lat_v), statistics.median(lat_r)
    return {
        "tasks": tasks,
        "rounds": rounds,
        "throughput": {
            "relier_per_s": round(tp_r, 1),
            "vanilla_per_s": round(tp_v, 1),
            "ratio": round(tp_r / tp_v, 3),
        },
        "latency": {
            "samples": samples,
            "relier_p50_ms": round(p50_r, 3),
            "vanilla_p50_ms": round(p50_v, 3),
            "added_p50_ms": round(p50_r - p50_v, 3),
            "relier_p99_ms": round(percentile(lat_r, 0.99) or 0, 3),
            "vanilla_p99_ms": round(percentile(lat_v, 0.99) or 0, 3),
        },
    }
