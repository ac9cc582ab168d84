"""A Celery app for the admission tests in real worker processes (relier by ``imports`` only)."""

from __future__ import annotations

import os

import redis
from celery import Celery

REDIS_URL = os.environ.get("RELIER_TEST_REDIS", "redis://127.0.0.1:6379/15")

app = Celery("admission_app", broker=REDIS_URL)
app.conf.update(imports=("relier_celery",), worker_hijack_root_logger=False)


@app.task(name="adm.flaky", bind=True, max_retries=5, admission="1/h", admission_burst=1)
def flaky(self, n: int, failures: int) -> int:  # type: ignore[no-untyped-def]
    """Retry ``failures`` times, then succeed: the retries must not be refused."""
    client = redis.Redis.from_url(REDIS_URL)
    if client.incr(f"test:flaky:{n}") <= failures:
        raise self.retry(countdown=0.1)
    client.sadd("test:done", n)
    return n


if os.environ.get("RELIER_TEST_BAD_ADMISSION") == "1":

    @app.task(name="adm.bad", admission="100 per second")
    def bad() -> None:
        pass
