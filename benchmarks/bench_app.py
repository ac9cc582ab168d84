"""The benchmark's Celery app; relier is enabled only when BENCH_RELIER=1, so vanilla Celery
and Celery + relier run the same tasks on the same Redis.

At ``worker_ready`` the worker writes its bootsteps and whether ``relier_celery`` was imported
to ``bench:bootsteps``, so a benchmark can show that its vanilla side ran without relier. Only
celery and redis are imported here: the vanilla side may run from a virtualenv without relier.
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

# Another broker (RabbitMQ, bench_rabbitmq.py): the counters and relier's state stay in Redis.
BROKER_URL = os.environ.get("BENCH_BROKER", REDIS_URL)

app = Celery("bench_app", broker=BROKER_URL)
app.conf.update(
    worker_hijack_root_logger=False,
    task_ignore_result=True,
    task_acks_late=os.environ.get("BENCH_ACKS_LATE") == "1",
)
if os.environ.get("BENCH_QUEUE"):  # a queue and control exchange of the run's own
    app.conf.task_default_queue = os.environ["BENCH_QUEUE"]
    app.conf.control_exchange = os.environ["BENCH_QUEUE"] + ".control"
if os.environ.get("BENCH_RELIER") == "1":
    app.conf.imports = ("relier_celery",)
    app.conf.relier_redis_url = REDIS_URL

_r = redis.Redis.from_url(REDIS_URL)


@worker_ready.connect
def report_bootsteps(sender: Any = None, **_: Any) -> None:
    """``sender`` is the consumer; its controller is the WorkController."""
    steps = sorted([*sender.controller.blueprint.steps, *sender.blueprint.steps])
    _r.set(
        "bench:bootsteps", json.dumps({"steps": steps, "imported": "relier_celery" in sys.modules})
    )


@app.task(name="bench.noop")
def noop() -> None:
    """Count one execution; remember when the first and the last ran."""
    now = time.time()
    pipe = _r.pipeline(transaction=False)
    pipe.set("bench:first", now, nx=True).set("bench:last", now).incr("bench:count")
    pipe.execute()


@app.task(name="bench.echo")
def echo(sent_at: float) -> None:
    """Report the end-to-end latency of one task."""
    _r.rpush("bench:latency", time.time() - sent_at)


@app.task(name="bench.hold", bind=True)
def hold(self, n: int, seconds: float) -> None:  # type: ignore[no-untyped-def]
    """Record each start of ``n`` and the worker it ran on, then hold the worker a while."""
    _r.rpush(f"bench:starts:{n}", f"{time.time()}|{self.request.hostname}")
    time.sleep(seconds)


@app.task(name="bench.job", bind=True)
def job(self, n: int, seconds: float) -> None:  # type: ignore[no-untyped-def]
    """A unit of a backlog: record each start (time, worker), work, record the end."""
    _r.rpush(f"bench:starts:{n}", f"{time.time()}|{self.request.hostname}")
    time.sleep(seconds)
    _r.pipeline(transaction=False).sadd("bench:ended", n).incr(f"bench:runs:{n}").execute()
