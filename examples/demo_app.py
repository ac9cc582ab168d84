"""The demo's Celery app. Relier is enabled by configuration alone: ``imports``."""

from __future__ import annotations

import os
import time

import redis
from celery import Celery

REDIS_URL = os.environ.get("DEMO_REDIS", "redis://127.0.0.1:6379/0")

app = Celery("demo_app", broker=REDIS_URL)
app.conf.update(
    imports=("relier_celery",),  # <- this line is all a worker needs
    worker_hijack_root_logger=False,
)

_r = redis.Redis.from_url(REDIS_URL)


@app.task(name="demo.process_order")
def process_order(order: int, seconds: float) -> int:
    """Pretend to process an order; record it as completed."""
    time.sleep(seconds)
    _r.sadd("demo:completed", order)
    return order
