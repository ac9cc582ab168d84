"""A plain Celery app for the enablement tests: relier is installed in the environment (Celery's
CLI imports it), but this app enables it only when ``RELIER_TEST_ENABLE=1``.

What relier could have changed is reported to Redis under ``test:`` keys: whether the package
was imported, the bootsteps of both blueprints (at ``worker_ready``), and per task whether a
relier TaskContext was set and which relier header the message carried.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_ready

REDIS_URL = os.environ.get("RELIER_TEST_REDIS", "redis://127.0.0.1:6379/15")

app = Celery("vanilla_app", broker=REDIS_URL)
app.conf.update(worker_hijack_root_logger=False, task_ignore_result=True)
if os.environ.get("RELIER_TEST_ENABLE") == "1":
    app.conf.imports = ("relier_celery",)

_r = redis.Redis.from_url(REDIS_URL)


@worker_ready.connect
def report_bootsteps(sender: Any = None, **_: Any) -> None:
    """``sender`` is the consumer; its controller is the WorkController."""
    steps = [*sender.controller.blueprint.steps, *sender.blueprint.steps]
    _r.set("test:bootsteps", json.dumps(sorted(steps)))
    _r.set("test:relier_imported", int("relier_celery" in sys.modules))


@app.task(name="vanilla.add", bind=True)
def add(self: Any, a: int, b: int) -> int:
    context = sys.modules.get("relier_celery.features.context")
    _r.rpush(
        "test:ran",
        json.dumps(
            {
                "id": self.request.id,
                "relier_context": bool(context is not None and context.peek() is not None),
                "relier_schema": getattr(self.request, "relier_schema", None),
            }
        ),
    )
    return a + b
