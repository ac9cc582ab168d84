"""The demo's Celery app. Relier is enabled by configuration alone: ``imports``.

``python3 dev.py demo`` runs it with a throwaway Redis of its own (``DEMO_REDIS``). To run it
as a cluster and send it work from another terminal::

    ../.venv/bin/rl -A demo_app cluster up --embedded   # prints the CELERY_BROKER_URL to use
    ../.venv/bin/python demo_app.py 40                  # send 40 orders (0.5-1.5 s each)
"""

from __future__ import annotations

import os
import random
import sys
import time

import redis
from celery import Celery

REDIS_URL = os.environ.get("DEMO_REDIS", "redis://127.0.0.1:6379/0")

app = Celery("demo_app", broker=REDIS_URL)
app.conf.update(
    imports=("relier_celery",),  # <- this line is all a worker needs
    worker_hijack_root_logger=False,
)

_r: redis.Redis | None = None


def _redis() -> redis.Redis:
    """The broker's Redis (``CELERY_BROKER_URL``, as ``-b`` or ``rl cluster up`` set it, comes
    before the app's own broker), where completed orders are recorded."""
    global _r
    if _r is None:
        _r = redis.Redis.from_url(app.conf.broker_url)
    return _r


@app.task(name="demo.process_order")
def process_order(order: int, seconds: float) -> int:
    """Pretend to process an order; record it as completed."""
    time.sleep(seconds)
    _redis().sadd("demo:completed", order)
    return order


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    rng = random.Random()
    for order in range(count):
        process_order.delay(order, rng.uniform(0.5, 1.5))
    print(f"sent {count} orders to {app.conf.broker_url}")
