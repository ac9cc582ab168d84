"""``async def`` tasks under Celery's synchronous tracer.

Celery runs task code synchronously. An ``async def`` task is wrapped at worker start so that
its coroutine runs on this process's persistent loop (loop.py), with its TaskContext and its
deadlines; the calling pool thread blocks on the result, and many threads (the threads pool)
share the one loop. :func:`wrap_run` is the one place a task's ``run`` is replaced; the async
and the idempotent wrappers stack there.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from relier_celery.features.context import bind_context
from relier_celery.features.loop import get_loop, run
from relier_celery.features.timeouts import context_for, guard, task_limits

__all__ = ["get_loop", "make_sync", "run"]

T = TypeVar("T")


def _run_task(task: Any, coro: Coroutine[Any, Any, T]) -> T:
    """Run one async task's coroutine on the loop, with its TaskContext and its deadlines."""
    ctx = context_for(task)
    return run(guard(bind_context(ctx, coro), ctx, task_limits(task)))


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
        "__relier_async__",
        inspect.iscoroutinefunction,
        lambda instance, call: _run_task(instance, call()),
    )
