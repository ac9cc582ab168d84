"""A Celery app for the admission tests in real worker processes (relier by ``imports`` only).
The broker is relier's Redis, or RabbitMQ with the test's own queue (``RELIER_TEST_BROKER``,
``RELIER_TEST_QUEUE``); a test builds its own publishing copy with :func:`make_app`."""

from __future__ import annotations

import os

import redis
from celery import Celery


def make_app(redis_url: str, broker_url: str = "", queue: str = "") -> Celery:
    """The app with its tasks, on ``broker_url`` (relier's Redis when empty)."""
    app = Celery("admission_app", broker=broker_url or redis_url, set_as_current=False)
    app.conf.update(imports=("relier_celery",), worker_hijack_root_logger=False)
    if broker_url and broker_url != redis_url:
        app.conf.relier_redis_url = redis_url
    if queue:  # its own queue and control exchange on a broker shared by other tests
        app.conf.task_default_queue = queue
        app.conf.control_exchange = f"{queue}.control"
        app.conf.event_exchange = f"{queue}.events"

    @app.task(
        name="adm.flaky", shared=False, bind=True, max_retries=5, admission="1/h", admission_burst=1
    )
    def flaky(self, n: int, failures: int) -> int:  # type: ignore[no-untyped-def]
        """Retry ``failures`` times, then succeed: the retries must not be refused."""
        client = redis.Redis.from_url(redis_url)
        if client.incr(f"test:flaky:{n}") <= failures:
            raise self.retry(countdown=0.1)
        client.sadd("test:done", n)
        return n

    @app.task(name="adm.bounded", shared=False, max_queue_depth=3)
    def bounded(n: int) -> int:
        """Refused while its queue on the broker holds 3 messages or more."""
        redis.Redis.from_url(redis_url).sadd("test:done", n)
        return n

    if os.environ.get("RELIER_TEST_BAD_ADMISSION") == "1":

        @app.task(name="adm.bad", shared=False, admission="100 per second")
        def bad() -> None:
            pass

    return app


app = make_app(
    os.environ.get("RELIER_TEST_REDIS", "redis://127.0.0.1:6379/15"),
    os.environ.get("RELIER_TEST_BROKER", ""),
    os.environ.get("RELIER_TEST_QUEUE", ""),
)
