"""Relier acts only in an app that enabled it (``imports``, ``include`` or ``install``): the
decision, and the signal handlers that every app's worker and publisher run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import redis
from celery import Celery

from relier_celery import install
from relier_celery.wiring.install import decide, enabled
from relier_celery.wiring.signals import on_before_task_publish, on_task_prerun, on_worker_init


@pytest.mark.parametrize(
    "conf",
    [
        {"imports": ("relier_celery",)},
        {"imports": ["myapp.tasks", "relier_celery"]},
        {"imports": ("relier_celery.wiring.tasks",)},
        {"imports": "relier_celery"},
        {"include": ["relier_celery"]},
        {"include": ("other", "relier_celery.wiring.bootsteps")},
    ],
)
def test_an_app_that_lists_relier_in_imports_or_include_is_enabled(conf) -> None:
    app = Celery("enabled_app", set_as_current=False)
    app.conf.update(conf)
    assert enabled(app)


def test_include_given_to_the_constructor_enables() -> None:
    app = Celery("enabled_app", include=["relier_celery"], set_as_current=False)
    assert enabled(app)


@pytest.mark.parametrize(
    "conf",
    [{}, {"imports": ("myapp.tasks",)}, {"imports": ("relier_celery_extra", "not_relier_celery")}],
)
def test_an_app_that_neither_lists_nor_installs_relier_is_not_enabled(conf) -> None:
    app = Celery("vanilla_app", set_as_current=False)
    app.conf.update(conf)
    assert not enabled(app)


def test_install_enables_even_after_a_no(redis_url: str) -> None:
    # Given an app that relier already found not enabled
    app = Celery("publisher_app", broker=redis_url, set_as_current=False)
    app.conf.relier_redis_url = redis_url
    assert not enabled(app)
    # When it calls install
    install(app)
    # Then relier acts in it, and a fresh decision agrees
    assert enabled(app)
    assert decide(app)


def test_the_decision_is_cached_per_app_and_decide_refreshes_it() -> None:
    app = Celery("late_app", set_as_current=False)
    assert not enabled(app)
    app.conf.imports = ("relier_celery",)
    assert not enabled(app)  # cached: the worker decides afresh at worker_init
    assert decide(app)
    assert enabled(app)


def test_not_an_app_is_not_enabled() -> None:
    assert not enabled(None)


def _worker(app: Celery) -> SimpleNamespace:
    return SimpleNamespace(app=app)


def test_worker_init_adds_no_bootstep_to_a_vanilla_app() -> None:
    # Given a vanilla app and an enabled one, in the same process
    vanilla = Celery("vanilla_app", set_as_current=False)
    relier = Celery("enabled_app", set_as_current=False)
    relier.conf.imports = ("relier_celery",)
    # When each one's worker starts
    on_worker_init(sender=_worker(vanilla))
    on_worker_init(sender=_worker(relier))
    # Then only the enabled app's blueprints have relier's steps
    labels = {
        app.main: {s.label for s in app.steps["worker"] | app.steps["consumer"]}
        for app in (vanilla, relier)
    }
    assert labels == {"vanilla_app": set(), "enabled_app": {"relier", "relier consumer"}}


def test_task_prerun_leaves_a_vanilla_task_alone() -> None:
    from relier_celery.features.context import peek

    app = Celery("vanilla_app", set_as_current=False)

    @app.task(name="vanilla.add", shared=False)
    def add() -> None: ...

    on_task_prerun(task=app.tasks["vanilla.add"])
    assert peek() is None


def test_a_vanilla_publisher_sends_no_relier_header(redis_url: str) -> None:
    # Given a vanilla app, current (the signal names only the task)
    app = Celery("vanilla_pub", broker=redis_url, set_as_current=True)

    @app.task(name="vanilla.v2", shared=False, schema_version=2)
    def v2() -> None: ...

    # When it publishes (and the handler is asked directly, too)
    app.tasks["vanilla.v2"].apply_async()
    headers = {"task": "vanilla.v2", "id": "t1"}
    on_before_task_publish(sender="vanilla.v2", headers=headers)
    # Then no message carries relier's schema header
    raw = redis.Redis.from_url(redis_url).lrange("celery", 0, -1)
    assert len(raw) == 1
    assert "relier_schema" not in json.loads(raw[0])["headers"]
    assert headers == {"task": "vanilla.v2", "id": "t1"}
