"""One persistent event loop per worker process, for ``async def`` tasks.

Celery runs task code synchronously. An ``async def`` task is wrapped at worker start so that
its coroutine runs on this process's loop, which lives in a daemon thread and is created on
first use after fork (a forked pool child never inherits its parent's loop). The calling pool
thread blocks on the result; many threads (the threads pool) share the one loop, so a process
runs many async tasks at once on a single loop. Never ``asyncio.run`` per task: creating and
closing a loop costs far more than the task, and it breaks clients that outlive one task.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from relier_celery.features.context import bind_context

__all__ = ["get_loop", "make_sync", "run"]

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_pid = -1


def get_loop() -> asyncio.AbstractEventLoop:
    """This process's persistent loop, started on first use."""
    global _loop, _pid
    if _loop is None or _pid != os.getpid():
        with _lock:
            if _loop is None or _pid != os.getpid():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="relier-event-loop", daemon=True
                )
                thread.start()
                _loop, _pid = loop, os.getpid()
    return _loop


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the persistent loop and wait for its result from a non-loop thread."""
    loop = get_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        coro.close()
        raise RuntimeError(
            "relier_celery.features.aio.run() called from the loop itself: await instead"
        )
    return asyncio.run_coroutine_threadsafe(coro, loop).result()


def _run_task(task: Any, coro: Coroutine[Any, Any, T]) -> T:
    """Run one async task's coroutine on the loop, with its TaskContext and its deadlines."""
    from relier_celery.features.timeouts import context_for, guard, task_limits

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
