"""What relier adds to Celery's tasks, the only place it changes their classes: ``push`` and
``apush`` (and admission's guard around ``apply_async``) on every task, and a replaced ``run``
for ``async def`` tasks (run on the process's loop, features/aio.py) and idempotent ones
(features/idempotency.py). The ``rl_task`` decorator is ``shared_task`` after the former.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from relier_celery.features import aio, idempotency
from relier_celery.features.admission import guard_apply_async
from relier_celery.features.dispatch import apush, push

__all__ = ["add_dispatch", "make_idempotent", "make_sync", "rl_task", "wrap_run"]


def wrap_run(
    task: Any,
    marker: str,
    applies: Callable[[Callable[..., Any]], bool],
    around: Callable[[Any, Callable[[], Any]], Any],
) -> bool:
    """Replace a Celery task's ``run`` (a staticmethod, or a plain function when bind=True)
    with ``around(task_instance, call)``; ``marker`` makes it idempotent. Celery's tracer
    calls ``run``, so relier's wrappers (async, idempotency) stack here, innermost first."""
    cls = type(task)
    raw = cls.__dict__.get("run")
    if raw is None:
        return False
    is_static = isinstance(raw, staticmethod)
    fn: Callable[..., Any] = raw.__func__ if is_static else raw
    if getattr(fn, marker, False) or not applies(fn):
        return False
    if is_static:

        @functools.wraps(fn)
        def run_static(*args: Any, **kwargs: Any) -> Any:
            return around(task, lambda: fn(*args, **kwargs))

        setattr(run_static, marker, True)
        cls.run = staticmethod(run_static)
    else:

        @functools.wraps(fn)
        def run_bound(self: Any, *args: Any, **kwargs: Any) -> Any:
            return around(self, lambda: fn(self, *args, **kwargs))

        setattr(run_bound, marker, True)
        cls.run = run_bound
    return True


def make_sync(task: Any) -> bool:
    """Make an ``async def`` Celery task runnable by Celery's synchronous tracer; return
    whether it was async. Idempotent."""
    return wrap_run(
        task,
        aio.ASYNC_MARKER,
        inspect.iscoroutinefunction,
        lambda instance, call: aio.run_task(instance, call()),
    )


def make_idempotent(task: Any) -> bool:
    """Wrap an ``idempotent=True`` task's run (after make_sync). Idempotent."""
    if not getattr(task, "idempotent", False):
        return False
    return wrap_run(
        task,
        "__relier_idempotent__",
        lambda fn: True,
        lambda instance, call: idempotency.guarded(instance, call),
    )


def add_dispatch() -> None:
    """Give every Celery task ``push`` and ``apush`` (idempotent)."""
    from celery.app.task import Task

    if getattr(Task, "push", None) is not push:
        Task.push = push
        Task.apush = apush
    if not getattr(Task.apply_async, "_relier_admission", False):
        Task.apply_async = guard_apply_async(Task.apply_async)


def rl_task(*args: Any, **options: Any) -> Any:
    """``shared_task`` with relier's options, sync or async: ``@rl_task(max_resurrections=5)``."""
    from celery import shared_task

    add_dispatch()

    def decorate(fn: Any) -> Any:
        # An async def function is made runnable by install(app), once the app is finalized.
        return shared_task(**options)(fn)

    if len(args) == 1 and callable(args[0]) and not options:
        return decorate(args[0])
    return decorate
