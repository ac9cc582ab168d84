"""Time of ``relier inspect --json`` with many tasks in flight.

    python benchmarks/bench_inspect.py [--tasks 10000] [--workers 20] [--runs 20]

Against a throwaway local redis-server: records as a worker's receipt writes them (Celery
protocol 2 headers, a trace context, a small body), spread over live workers (half of each
one's tasks running) and two dead ones. Prints p50/max of the snapshot alone (the Redis reads
and parsing), of snapshot + JSON, of snapshot + text, and the wall time of the whole
``rl -A app inspect --json`` process, next to ``rl -A app config`` (the same process start-up,
without the snapshot). A benchmark, not a test: it prints figures and never fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from stats import timed

from relier_celery.cli.render import render
from relier_celery.core.keys import Keys
from relier_celery.core.record import TaskRecord
from relier_celery.observe.activity import RunningMarker
from relier_celery.observe.snapshot import take
from relier_celery.observe.summary import to_json
from relier_celery.store.client import Store
from relier_celery.testing import RedisServer, task_headers


def fill(store: Store, tasks: int, workers: int) -> None:
    names = [f"bench@host{i}/{1000 + i}/{uuid.uuid4().hex[:8]}" for i in range(workers)]
    dead = set(names[:2])
    for w in names:
        store.renew_lease(w, ttl=0.01 if w in dead else 600)
    running: dict[str, dict[str, float]] = {w: {} for w in names}
    for i in range(tasks):
        w = names[i % workers]
        task_id = str(uuid.uuid4())
        rec = TaskRecord(
            task_id=task_id,
            task_name=f"shop.tasks.job_{i % 7}",
            body=json.dumps([[i, f"order-{i:06d}"], {"priority": "normal"}, {}]).encode(),
            content_type="application/json",
            content_encoding="utf-8",
            headers=task_headers(
                task_id,
                f"shop.tasks.job_{i % 7}",
                argsrepr=f"({i}, 'order-{i:06d}')",
                kwargsrepr="{'priority': 'normal'}",
                traceparent=f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01",
            ),
            properties={"correlation_id": task_id, "reply_to": str(uuid.uuid4())},
            exchange="",
            routing_key="celery",
            worker=w,
        )
        store.record(task_id, w, rec.generation, rec.dumps())
        if i % 2 == 0:
            running[w][task_id] = time.time() - i % 30
    for w in names:
        if w not in dead:
            RunningMarker(store, w, 600, lambda w=w: running[w]).publish()  # type: ignore[misc]
    time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    with RedisServer() as url, tempfile.TemporaryDirectory() as tmp:
        store = Store(url, Keys("rl"))
        start = time.perf_counter()
        fill(store, args.tasks, args.workers)
        print(
            f"wrote {args.tasks} records for {args.workers} workers in "
            f"{time.perf_counter() - start:.1f} s"
        )
        used = store.call(lambda c: c.info("memory")["used_memory_human"])
        print(f"redis used_memory: {used}")
        snap = take(store, 600)
        size = len(json.dumps(to_json(snap)))
        print(
            f"snapshot: {len(snap.tasks)} tasks, {len(snap.workers)} workers, "
            f"JSON {size / 1e6:.1f} MB"
        )
        figures = {
            "snapshot": timed(lambda _: take(store, 600), args.runs, 1e3),
            "snapshot + JSON": timed(
                lambda _: json.dumps(to_json(take(store, 600))), args.runs, 1e3
            ),
            "snapshot + text": timed(lambda _: render(take(store, 600)), args.runs, 1e3),
        }
        Path(tmp, "benchapp.py").write_text(
            "from celery import Celery\n"
            f"app = Celery('benchapp', broker={url!r})\n"
            "app.conf.imports = ('relier_celery',)\n"
            "app.conf.relier_lease_ttl = 600\n"
        )
        rl = str(Path(sys.executable).parent / "rl")

        def cli(*cmd: str) -> None:
            subprocess.run(
                [rl, "-A", "benchapp", *cmd], cwd=tmp, check=True, stdout=subprocess.DEVNULL
            )

        runs = max(3, args.runs // 4)
        figures["process: rl inspect --json"] = timed(lambda _: cli("inspect", "--json"), runs, 1e3)
        figures["process: rl config (start-up)"] = timed(lambda _: cli("config"), runs, 1e3)
    for name, values in figures.items():
        print(f"{name:>31}: p50 {statistics.median(values):7.1f} ms, max {max(values):7.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
