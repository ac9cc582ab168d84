"""Fast tests: pure logic, and Lua scripts against a throwaway redis-server (never a user's)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from relier_celery.core import events
from relier_celery.core.keys import Keys
from relier_celery.store.client import Store
from relier_celery.testing import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A clean database on the session's throwaway server."""
    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


@pytest.fixture
def store(redis_url: str) -> Store:
    return Store(redis_url, Keys("rl"))


@pytest.fixture
def captured() -> Iterator[list[events.Event]]:
    """Every relier event emitted during the test."""
    seen: list[events.Event] = []
    events.subscribe(seen.append)
    yield seen
    events.unsubscribe(seen.append)
