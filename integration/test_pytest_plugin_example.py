"""The example of docs/pytest-plugin.md, written as a user writes it: relier's pytest plugin
starts real workers of the user's app; one is SIGKILLed mid-task and the task still finishes."""

from __future__ import annotations

import pytest

from relier_celery.testing import wait_for


@pytest.fixture(scope="session")
def relier_app_target() -> str:
    return "plugin_example_app:app"


@pytest.fixture(scope="session")
def relier_config() -> dict[str, object]:
    return {"task_track_started": True}


@pytest.mark.timeout(90)
def test_a_task_survives_its_worker_being_killed(relier_app, relier_worker_factory) -> None:
    # Given a worker running a task of a few seconds
    first = relier_worker_factory.start()
    result = relier_app.send_task("example.slow_add", args=(2, 3, 3))
    wait_for(lambda: result.state == "STARTED", 30, what="the task to start")
    # When that worker is SIGKILLed mid-task and another one starts
    first.kill()
    relier_worker_factory.start()
    # Then the task runs again there and its result reaches the backend
    assert result.get(timeout=45) == 5
