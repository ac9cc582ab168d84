"""``TaskContext``: what a running task knows about itself, the same in sync and async code.

Inside a task, ``TaskContext.current()`` gives the task id, name, arguments, Celery's retry
count, relier's resurrection and crash counts, and a ``progress`` dict for partial results.
Async tasks get it through a context variable set in their own asyncio task; sync tasks read
Celery's current request.
"""

from __future__ import annotations

import contextvars
import json
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from relier_celery import runtime
from relier_celery.core.errors import RelierError
from relier_celery.core.headers import CRASHES_HEADER, RESURRECTIONS_HEADER

__all__ = ["TaskContext", "bind_context", "set_current"]

T = TypeVar("T")

_current: contextvars.ContextVar[TaskContext | None] = contextvars.ContextVar(
    "relier_task_context", default=None
)


@dataclass
class TaskContext:
    """The running task, as relier sees it."""

    task_id: str
    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    retries: int = 0
    resurrections: int = 0
    crashes: int = 0
    deadline: float | None = None
    """When the hard timeout stops the task (epoch seconds), if it has one."""
    progress: dict[str, Any] = field(default_factory=dict)
    """Partial results; ``save_progress`` also keeps them in Redis."""
    idempotency_key: str | None = None
    """An idempotent task's key: pass it on to the system the side effect changes (a payment
    provider's idempotency key, a unique column), so a run repeated after a crash is safe."""
    app: Any = field(default=None, repr=False, compare=False)

    def save_progress(self, **data: Any) -> None:
        """Merge ``data`` into ``progress`` and keep it in Redis for ``relier_completed_ttl``,
        readable after the task (or its worker) is gone with ``TaskContext.load_progress``."""
        self.progress.update(data)
        relier = runtime.install(self.app)
        relier.store.save_progress(
            self.task_id, json.dumps(self.progress, default=str), relier.config.completed_ttl
        )

    @staticmethod
    def load_progress(app: Any, task_id: str) -> dict[str, Any]:
        """The progress a task saved, or {}."""
        raw = runtime.install(app).store.load_progress(task_id)
        return dict(json.loads(raw)) if raw else {}

    @classmethod
    def from_task(cls, task: Any) -> TaskContext:
        """Build from a Celery task's current request (the calling thread's)."""
        request = task.request
        headers = getattr(request, "headers", None) or {}
        return cls(
            task_id=str(request.id),
            name=str(task.name),
            args=tuple(request.args or ()),
            kwargs=dict(request.kwargs or {}),
            retries=int(request.retries or 0),
            resurrections=int(headers.get(RESURRECTIONS_HEADER) or 0),
            crashes=int(headers.get(CRASHES_HEADER) or 0),
            app=task.app,
        )

    @classmethod
    def current(cls) -> TaskContext:
        """The context of the task running here; raises RelierError outside a task."""
        ctx = _current.get()
        if ctx is not None:
            return ctx
        from celery import current_task

        task = current_task._get_current_object() if current_task else None
        if task is None or task.request.id is None:
            raise RelierError("TaskContext.current() called outside a running task")
        ctx = cls.from_task(task)
        return ctx


def set_current(ctx: TaskContext | None) -> contextvars.Token[TaskContext | None]:
    """Make ``ctx`` the current TaskContext of this thread (the worker does this per task)."""
    return _current.set(ctx)


def reset_current(token: contextvars.Token[TaskContext | None]) -> None:
    _current.reset(token)


def peek() -> TaskContext | None:
    """The current TaskContext, if one was set."""
    return _current.get()


async def bind_context(ctx: TaskContext, coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` with ``ctx`` as its TaskContext (each asyncio task has its own copy)."""
    _current.set(ctx)
    return await coro
