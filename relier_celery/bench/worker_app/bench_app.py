"""The benchmark's Celery app, run by every benchmark worker; relier is enabled only when
``BENCH_RELIER=1``, so vanilla Celery and Celery + relier run the same tasks on the same Redis.

``BENCH_REDIS`` is the broker; ``BENCH_CONF`` (JSON) adds settings a phase needs (the vanilla
side's ``task_acks_late``, a short ``relier_drain_timeout``). At ``worker_ready`` each worker
writes its bootsteps and whether ``relier_celery`` was imported to ``bench:bootsteps:<host>``,
so a benchmark can show that its vanilla side ran without relier. Tasks record what they did
under ``bench:`` keys, so the benchmark counts executions and side effects from outside.

Only celery and redis are imported here, and nothing of the package around this file: the
vanilla side may run it from a virtualenv where relier is not installed at all.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_ready

REDIS_URL = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0")

# Another broker (RabbitMQ, benchmarks/bench_rabbitmq.py): the counters and relier's state
# stay in BENCH_REDIS, and BENCH_QUEUE names a queue and control exchange of the run's own.
BROKER_URL = os.environ.get("BENCH_BROKER", REDIS_URL)

app = Celery("bench_app", broker=BROKER_URL)
app.conf.update(worker_hijack_root_logger=False, task_ignore_result=True)
if os.environ.get("BENCH_QUEUE"):
    app.conf.task_default_queue = os.environ["BENCH_QUEUE"]
    app.conf.control_exchange = os.environ["BENCH_QUEUE"] + ".control"
if os.environ.get("BENCH_RELIER") == "1":
    app.conf.imports = ("relier_celery",)
    app.conf.relier_redis_url = REDIS_URL
app.conf.update(json.loads(os.environ.get("BENCH_CONF") or "{}"))

_r = redis.Redis.from_url(REDIS_URL)


@worker_ready.connect  # type: ignore[untyped-decorator]
def report_bootsteps(sender: Any = None, **_: Any) -> None:
    """``sender`` is the consumer; its controller is the WorkController."""
    steps = sorted([*sender.controller.blueprint.steps, *sender.blueprint.steps])
    _r.set(
        f"bench:bootsteps:{sender.hostname}",
        json.dumps({"steps": steps, "imported": "relier_celery" in sys.modules}),
    )


@app.task(name="bench.noop")  # type: ignore[untyped-decorator]
def noop() -> None:
    """Count one execution; remember when the first and the last ran."""
    now = time.time()
    pipe = _r.pipeline(transaction=False)
    pipe.set("bench:first", now, nx=True)
    pipe.set("bench:last", now)
    pipe.incr("bench:count")
    pipe.execute()


@app.task(name="bench.echo")  # type: ignore[untyped-decorator]
def echo(sent_at: float) -> None:
    """Report the end-to-end latency of one task."""
    _r.rpush("bench:latency", time.time() - sent_at)


@app.task(name="bench.hold", bind=True)  # type: ignore[untyped-decorator]
def hold(self: Any, n: int, seconds: float) -> None:
    """Record each start of ``n`` and the worker it ran on, then hold the worker a while."""
    _r.rpush(f"bench:starts:{n}", f"{time.time()}|{self.request.hostname}")
    time.sleep(seconds)


@app.task(name="bench.job", bind=True)  # type: ignore[untyped-decorator]
def job(self: Any, n: int, seconds: float) -> None:
    """A unit of a backlog: record each start (time, worker), work, record the end (with the
    start it ends)."""
    started = f"{time.time()}|{self.request.hostname}"
    _r.rpush(f"bench:starts:{n}", started)
    time.sleep(seconds)
    pipe = _r.pipeline(transaction=False)
    pipe.sadd("bench:ended", n)
    pipe.rpush(f"bench:ends:{n}", started)
    pipe.incr(f"bench:runs:{n}")
    pipe.execute()


# Idempotent under relier (the key is the task name with its arguments, so every duplicate
# dispatch of an order shares one key); vanilla Celery keeps the option as an attribute only.
@app.task(name="bench.charge", idempotent=True)  # type: ignore[untyped-decorator]
def charge(order: int, seconds: float) -> None:
    """Work, then one side effect per run (a charge of ``order``). Runs in progress are listed
    (pool pid -> worker pid), so the benchmark can SIGKILL a worker that is charging."""
    _r.hset("bench:charging", str(os.getpid()), str(os.getppid()))
    time.sleep(seconds)
    pipe = _r.pipeline(transaction=False)
    pipe.incr(f"bench:charged:{order}")
    pipe.hdel("bench:charging", str(os.getpid()))
    pipe.execute()
