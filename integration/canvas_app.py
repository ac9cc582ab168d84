"""A Celery app with a Redis result backend, for the tests of Celery's own semantics under
relier: ``Task.replace`` (the replacement gets the replaced task's id), chains, groups and
chords through it, re-applied frozen signatures, errbacks and chord errbacks.

Relier is enabled by configuration only (``imports``), with its defaults (the reliable fetch;
``RELIER_TEST_CONF`` may turn it off, as ``fleet.fetch_env`` does). Errbacks count their calls
in Redis under ``test:errback:<failed task id>``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import redis
from celery import Celery, chain

REDIS_URL = os.environ.get("RELIER_TEST_REDIS", "redis://127.0.0.1:6379/15")

app = Celery("canvas_app", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    imports=("relier_celery",),
    worker_hijack_root_logger=False,
    worker_prefetch_multiplier=4,
    relier_lease_ttl=3.0,
    relier_heartbeat_interval=0.5,
    relier_scan_interval=0.5,
)
app.conf.update(json.loads(os.environ.get("RELIER_TEST_CONF", "{}")))

_r: redis.Redis | None = None


def r() -> redis.Redis:
    global _r
    if _r is None:
        _r = redis.Redis.from_url(REDIS_URL)
    return _r


class ExpectedError(Exception):
    """What ``canvas.fail`` raises."""


@app.task(name="canvas.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="canvas.identity")
def identity(x: Any) -> Any:
    return x


@app.task(name="canvas.replaced", bind=True)
def replaced(self: Any, x: int) -> None:
    """Replace itself with ``add(x, 1)``: the replacement is published under this task's id."""
    r().incr(f"test:replaced:{self.request.id}")
    raise self.replace(add.s(x, 1))


@app.task(name="canvas.replaced_with_chain", bind=True)
def replaced_with_chain(self: Any, x: int) -> None:
    """Replace itself with ``identity(x) | add(10)``."""
    raise self.replace(chain(identity.s(x), add.s(10)))


@app.task(name="canvas.reject_then_succeed", bind=True, acks_late=True)
def reject_then_succeed(self: Any) -> str:
    """Celery's own suite's task: give the message back once, tell the second delivery by
    ``delivery_info['redelivered']`` (kombu marks a message it puts back)."""
    from celery.exceptions import Reject

    if not self.request.delivery_info.get("redelivered"):
        raise Reject(requeue=True)
    return "second-pass"


@app.task(name="canvas.count")
def count(x: Any, key: str) -> Any:
    """Record one run under ``key`` (to see a chord body run again)."""
    r().incr(key)
    return x


@app.task(name="canvas.fail")
def fail(*args: Any) -> None:
    raise ExpectedError("expected failure")


@app.task(name="canvas.errback_old_style")
def errback_old_style(request_id: str) -> str:
    """An errback of Celery's old style: published as a task with the failed task's id."""
    r().incr(f"test:errback:{request_id}")
    return request_id


@app.task(name="canvas.errback_new_style")
def errback_new_style(request: Any, exc: BaseException, tb: Any) -> str:
    """An errback of the new style: Celery calls it in the process that saw the failure."""
    r().incr(f"test:errback:{request.id}")
    return str(request.id)
