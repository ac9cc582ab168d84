"""The persistent event loop, async tasks, TaskContext and push/apush."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest
import redis
from celery import Celery

from relier_celery import TaskContext, install
from relier_celery.core.errors import RelierError
from relier_celery.features import aio
from relier_celery.features.dispatch import split_options


def test_one_loop_serves_every_call_in_a_process() -> None:
    async def which() -> int:
        await asyncio.sleep(0)
        return id(asyncio.get_running_loop())

    assert len({aio.run(which()) for _ in range(20)}) == 1
    assert aio.get_loop().is_running()


def test_run_from_the_loop_itself_is_refused_not_deadlocked() -> None:
    async def inner() -> None:
        aio.run(asyncio.sleep(0))

    with pytest.raises(RuntimeError, match="await instead"):
        aio.run(inner())


@pytest.fixture
def app(redis_url: str) -> Celery:
    app = Celery("aio_app", broker=redis_url)

    @app.task(name="aio.plain", shared=False)
    async def plain(x: int) -> dict:
        await asyncio.sleep(0.01)
        ctx = TaskContext.current()
        return {"x": x, "id": ctx.task_id, "name": ctx.name}

    @app.task(name="aio.bound", bind=True, shared=False)
    async def bound(self, x: int) -> str:
        return f"{self.name}:{x}:{TaskContext.current().task_id}"

    @app.task(name="aio.sync", shared=False)
    def sync(x: int) -> str:
        return TaskContext.current().task_id

    install(app)
    return app


def test_async_tasks_run_through_celerys_tracer_with_their_context(app: Celery) -> None:
    result = app.tasks["aio.plain"].apply(args=(3,), task_id="t-1").get()
    assert result == {"x": 3, "id": "t-1", "name": "aio.plain"}
    assert app.tasks["aio.bound"].apply(args=(4,), task_id="t-2").get() == "aio.bound:4:t-2"
    assert app.tasks["aio.sync"].apply(args=(5,), task_id="t-3").get() == "t-3"


def test_task_context_outside_a_task_is_a_clear_error() -> None:
    with pytest.raises(RelierError, match="outside a running task"):
        TaskContext.current()


def test_push_separates_dispatch_options_from_task_kwargs(app: Celery, redis_url: str) -> None:
    assert split_options({"countdown": 5, "x": 1}) == ({"x": 1}, {"countdown": 5})
    result = app.tasks["aio.plain"].push(x=7, countdown=30, headers={"tenant": "a"})
    (raw,) = redis.Redis.from_url(redis_url).lrange("celery", 0, -1)
    message = json.loads(raw)
    args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert (args, kwargs) == ([], {"x": 7})
    assert message["headers"]["id"] == result.id
    assert message["headers"]["eta"] is not None
    assert message["headers"]["tenant"] == "a"


def test_apush_does_not_block_the_event_loop(app: Celery, monkeypatch) -> None:
    # Given a slow broker (a publish that blocks for 0.3 s)
    task = app.tasks["aio.plain"]

    def slow_push(*args, **kwargs):
        time.sleep(0.3)
        return "published"

    monkeypatch.setattr(task, "push", slow_push)

    async def scenario() -> tuple[str, int]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        ticking = asyncio.create_task(ticker())
        result = await task.apush(1)
        stop.set()
        await ticking
        return result, ticks

    # When apush is awaited, Then the loop keeps ticking meanwhile
    result, ticks = asyncio.run(scenario())
    assert result == "published"
    assert ticks >= 10


def test_rl_task_is_shared_task_with_relier_options_and_push(redis_url: str) -> None:
    from relier_celery import rl_task

    @rl_task(name="aio.rl", max_resurrections=5, soft_timeout=1, hard_timeout=2)
    async def rl(x: int) -> int:
        return x * 2

    app = Celery("rl_app", broker=redis_url)
    install(app)
    task = app.tasks["aio.rl"]
    assert (task.max_resurrections, task.soft_timeout, task.hard_timeout) == (5, 1, 2)
    assert task.apply(args=(21,)).get() == 42
    assert task.push(1).id
