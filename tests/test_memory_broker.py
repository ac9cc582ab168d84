"""Celery's own test setup, an app on the in-process ``memory://`` broker: relier listed in its
``imports`` but no ``relier_redis_url`` runs the worker as plain Celery, with one warning line;
any other broker without a Redis for relier stays an error at start."""

from __future__ import annotations

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker

from relier_celery import install
from relier_celery.core import events
from relier_celery.core.errors import ConfigError
from relier_celery.wiring.install import decide, enabled


def _memory_app(name: str, **conf: object) -> Celery:
    app = Celery(name, broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.update(imports=("relier_celery",), **conf)
    return app


def test_a_memory_broker_without_a_relier_redis_is_inactive_with_one_warning() -> None:
    seen: list[events.Event] = []
    events.subscribe(seen.append)
    try:
        # Given an app that lists relier, on the memory broker, with no relier_redis_url
        app = _memory_app("memory_app")
        # When relier decides, again and again (every worker_init, every first publish)
        assert not enabled(app)
        assert not decide(app)
        assert not decide(app)
    finally:
        events.unsubscribe(seen.append)
    # Then it is inactive, said once, with the reason
    (warning,) = [e for e in seen if e.name == "config.warning"]
    assert "relier is inactive" in warning.message and "memory://" in warning.message
    assert "relier_redis_url" in warning.message


def test_a_memory_broker_with_a_relier_redis_keeps_relier(redis_url: str) -> None:
    app = _memory_app("memory_with_redis", relier_redis_url=redis_url)
    assert decide(app)


def test_any_other_broker_without_a_redis_for_relier_is_an_error_at_start() -> None:
    app = Celery("amqp_app", broker="amqp://guest@localhost//", set_as_current=False)
    app.conf.imports = ("relier_celery",)
    assert decide(app)
    with pytest.raises(ConfigError, match="relier_redis_url is not set"):
        install(app)


def test_celerys_embedded_test_worker_runs_tasks_as_plain_celery() -> None:
    # Given Celery's own in-memory test setup with relier listed
    app = _memory_app("embedded_app")

    @app.task(name="embedded.add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    # (the worker takes over logging: its lines are counted as events, one line each)
    seen: list[events.Event] = []
    events.subscribe(seen.append)
    try:
        # When the embedded worker starts and runs a task
        with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10) as w:
            assert add.delay(2, 3).get(timeout=10) == 5
            steps = [type(s).__name__ for s in w.blueprint.steps.values()]
    finally:
        events.unsubscribe(seen.append)
    # Then it ran as plain Celery (no relier bootstep), with one warning line saying why
    assert not any(name.startswith("Relier") for name in steps)
    assert [e.name for e in seen] == ["config.warning"]
    assert "relier is inactive" in seen[0].message
