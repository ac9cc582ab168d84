"""Timeout options: validation, the async guard, the sync watchdog, and hooks that fail."""

from __future__ import annotations

import asyncio
import time

import pytest
from celery import Celery

from relier_celery import TaskContext, install
from relier_celery.core.config import RelierConfig
from relier_celery.core.errors import ConfigError, HardTimeout
from relier_celery.features.timeouts import Limits, Watchdog
from relier_celery.wiring.task_options import validate_task_options

REDIS = "redis://127.0.0.1:6379/0"


def _app_with(**options) -> Celery:
    app = Celery("t", broker=REDIS)

    @app.task(name="timeouts.job", shared=False, **options)
    def job() -> None: ...

    return app


@pytest.mark.parametrize(
    "options,message",
    [
        ({"soft_timeout": 5, "hard_timeout": 5}, "hard_timeout .* must be above .*soft_timeout"),
        ({"soft_timeout": 9, "hard_timeout": 3}, "hard_timeout .* must be above .*soft_timeout"),
        ({"hard_timeout": -1}, "hard_timeout must be a number of seconds above 0"),
        ({"soft_timeout": "10"}, "soft_timeout must be a number of seconds above 0"),
        ({"soft_timeout": True}, "soft_timeout must be a number of seconds above 0"),
        ({"on_soft_timeout": "save"}, "on_soft_timeout must be a callable"),
        ({"soft_timout": 3}, "did you mean 'soft_timeout'"),
    ],
)
def test_bad_timeout_options_stop_the_worker_with_a_clear_error(options, message) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_task_options(_app_with(**options))


def test_good_timeout_options_pass() -> None:
    validate_task_options(_app_with(soft_timeout=1, hard_timeout=2.5, on_soft_timeout=print))


def test_config_defaults_are_validated_too() -> None:
    with pytest.raises(ConfigError, match=r"relier_hard_timeout .* must be above"):
        RelierConfig.from_mapping(
            {"relier_soft_timeout": 10, "relier_hard_timeout": 5}, broker_url=REDIS
        )
    config = RelierConfig.from_mapping({"relier_hard_timeout": 30}, broker_url=REDIS)
    assert (config.soft_timeout, config.hard_timeout) == (None, 30.0)


def test_an_async_task_past_its_hard_timeout_is_cancelled_and_fails(redis_url: str) -> None:
    app = Celery("guard", broker=redis_url)
    seen: dict[str, object] = {}

    def hook(ctx: TaskContext) -> None:
        seen["soft"] = ctx.task_id

    @app.task(
        name="timeouts.stall",
        shared=False,
        soft_timeout=0.1,
        hard_timeout=0.3,
        on_soft_timeout=hook,
    )
    async def stall() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            seen["cleanup"] = True

    install(app)
    started = time.monotonic()
    result = app.tasks["timeouts.stall"].apply(task_id="s-1")
    assert result.failed() and isinstance(result.result, HardTimeout)
    assert time.monotonic() - started < 5
    assert seen["cleanup"] is True
    time.sleep(0.1)
    assert seen["soft"] == "s-1"


def test_an_async_tasks_own_timeout_error_is_not_a_hard_timeout(redis_url: str) -> None:
    app = Celery("own", broker=redis_url)

    @app.task(name="timeouts.own", shared=False, hard_timeout=5)
    async def own() -> None:
        raise TimeoutError("upstream timed out")

    install(app)
    result = app.tasks["timeouts.own"].apply()
    assert isinstance(result.result, TimeoutError)
    assert not isinstance(result.result, HardTimeout)


def test_a_hook_that_raises_is_reported_and_the_task_goes_on(caplog) -> None:
    def broken(ctx: TaskContext) -> None:
        raise ValueError("disk full")

    ctx = TaskContext(task_id="t1", name="x")
    watchdog = Watchdog(ctx, Limits(soft=0.05, hook=broken))
    watchdog.start()
    time.sleep(0.3)
    watchdog.stop()
    assert "on_soft_timeout raised ValueError('disk full'); the task goes on" in caplog.text
