"""``async def`` tasks under Celery's synchronous tracer.

Celery runs task code synchronously. An ``async def`` task is wrapped at worker start so that
its coroutine runs on this process's persistent loop (loop.py), with its TaskContext and its
deadlines; the calling pool thread blocks on the result, and many threads (the threads pool)
share the one loop. The wiring replaces the task's ``run`` (wiring/task_methods.py) with a call of
:func:`run_task`.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from relier_celery.features.context import bind_context
from relier_celery.features.loop import get_loop, run
from relier_celery.features.timeouts import ASYNC_MARKER, context_for, guard, task_limits

__all__ = ["ASYNC_MARKER", "get_loop", "run", "run_task"]

T = TypeVar("T")


def run_task(task: Any, coro: Coroutine[Any, Any, T]) -> T:
    """Run one async task's coroutine on the loop, with its TaskContext and its deadlines."""
    ctx = context_for(task)
    return run(guard(bind_context(ctx, coro), ctx, task_limits(task)))
