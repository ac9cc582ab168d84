"""Integration fixtures: a fresh redis-server per test and real ``celery worker`` processes
running ``chaos_app``, started as subprocesses and cleaned up by PID."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from fleet import Broker, Fleet

from relier_celery.testing import RedisServer


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every test on a RabbitMQ quorum queue goes in one xdist group (``--dist loadgroup``):
    # they share Celery's delayed-delivery queues and take a lock for it; in one group they run
    # one after the other on one test process instead of one process waiting on the lock.
    for item in items:
        item.add_marker(pytest.mark.integration)
        spec = getattr(item, "callspec", None)
        kind = spec.params.get("broker") if spec is not None else None
        if isinstance(kind, str) and kind.startswith("rabbitmq-quorum"):
            item.add_marker(pytest.mark.xdist_group("rabbitmq-quorum"))


@pytest.fixture
def redis_url() -> Iterator[str]:
    server = RedisServer()
    yield server.start()
    server.stop()


@pytest.fixture
def r(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


@pytest.fixture
def broker(request: pytest.FixtureRequest, redis_url: str) -> Iterator[Broker]:
    """The broker of the fleet and the publisher: relier's Redis, unless a test asks for
    ``rabbitmq`` (``@pytest.mark.parametrize("broker", BROKERS, indirect=True)``) or
    ``rabbitmq-quorum`` (its queue a quorum queue)."""
    kind = getattr(request, "param", "redis")
    if kind == "redis":
        yield Broker("redis", redis_url)
        return
    b = Broker.rabbitmq(kind)
    if b.queue_args:
        with Broker.quorum_lock():
            yield b
            b.clean()
        return
    yield b
    b.clean()


@pytest.fixture
def fleet(broker: Broker, redis_url: str, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(redis_url, tmp_path)
    f.env.update(broker.env)
    yield f
    f.stop_all()


@pytest.fixture
def publisher(broker: Broker) -> Iterator[Celery]:
    app = Celery("publisher", broker=broker.url)
    broker.configure(app)
    yield app
    app.close()
