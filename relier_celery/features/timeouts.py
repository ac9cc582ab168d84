"""Soft and hard timeouts with a cleanup hook, for sync and async tasks.

At the soft deadline the task's ``on_soft_timeout(ctx)`` hook runs while the task goes on (it
can save progress with ``ctx.save_progress``). At the hard deadline:

- an async task's coroutine is cancelled (``CancelledError`` inside it, so ``finally`` blocks
  run) and the task fails with :class:`HardTimeout`;
- a sync task in the prefork pool is stopped by Celery's own ``time_limit``, which relier sets
  to the hard timeout at worker start (the task fails with ``TimeLimitExceeded``);
- a sync task in the threads or solo pool cannot be interrupted by anyone: relier reports the
  hard timeout loudly and the task runs on.

A timed-out task is a failure (Celery's retry policy applies), never a resurrection. Every
timeout is a ``task.timeout`` event with ``timeout_type`` soft or hard. A hook that raises is
reported and never breaks the task.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from relier_celery import runtime
from relier_celery.core import events
from relier_celery.core.config import check_timeouts
from relier_celery.core.errors import ConfigError, HardTimeout
from relier_celery.features.context import TaskContext, peek, reset_current, set_current
from relier_celery.features.loop import run

__all__ = ["Limits", "Watchdog", "begin", "end", "guard", "limits_of", "run_hook", "task_limits"]

T = TypeVar("T")

# Whether hard timeouts of sync tasks are enforced (Celery's time_limit, prefork only). Set by
# the worker step at start; pool children inherit it through fork.
# The task options this feature reads (wiring/task_options.py checks every task's against all).
TASK_OPTIONS = ("soft_timeout", "hard_timeout", "on_soft_timeout")


def validate_task(name: str, task: Any) -> None:
    """Raise :class:`ConfigError` for a bad ``soft_timeout``, ``hard_timeout`` or
    ``on_soft_timeout`` of a task."""
    soft = getattr(task, "soft_timeout", None)
    hard = getattr(task, "hard_timeout", None)
    for option, limit in (("soft_timeout", soft), ("hard_timeout", hard)):
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int | float) or limit <= 0
        ):
            raise ConfigError(
                f"task {name!r}: {option} must be a number of seconds above 0, got {limit!r}"
            )
    check_timeouts(f"task {name!r}: soft_timeout", "hard_timeout", soft, hard)
    hook = getattr(task, "on_soft_timeout", None)
    if hook is not None and not callable(hook):
        raise ConfigError(
            f"task {name!r}: on_soft_timeout must be a callable taking a TaskContext, got {hook!r}"
        )


@dataclass(frozen=True)
class Limits:
    """A task's timeouts, in seconds (None: none)."""

    soft: float | None = None
    hard: float | None = None
    hook: Callable[[TaskContext], Any] | None = None

    def __bool__(self) -> bool:
        return self.soft is not None or self.hard is not None


def limits_of(task: Any, soft_default: float | None, hard_default: float | None) -> Limits:
    """The task's options, falling back to the configured defaults."""
    soft = getattr(task, "soft_timeout", None)
    hard = getattr(task, "hard_timeout", None)
    return Limits(
        soft=float(soft) if soft is not None else soft_default,
        hard=float(hard) if hard is not None else hard_default,
        hook=_hook_of(task),
    )


def _hook_of(task: Any) -> Callable[[TaskContext], Any] | None:
    """The on_soft_timeout option as given: Celery stores task options as class attributes,
    so a plain function would come back bound to the task."""
    try:
        hook = inspect.getattr_static(task, "on_soft_timeout")
    except AttributeError:
        return None
    if isinstance(hook, staticmethod | classmethod):
        hook = hook.__func__
    return hook  # type: ignore[no-any-return]


def task_limits(task: Any) -> Limits:
    """The task's limits, with the app's ``relier_soft_timeout``/``relier_hard_timeout``."""
    relier = runtime.of(task.app)
    if relier is None:
        return limits_of(task, None, None)
    return limits_of(task, relier.config.soft_timeout, relier.config.hard_timeout)


# Set on a task's ``run`` once it is wrapped to run its coroutine (wiring/task_methods.py).
ASYNC_MARKER = "__relier_async__"


def is_async(task: Any) -> bool:
    return bool(getattr(getattr(type(task), "run", None), ASYNC_MARKER, False))


def context_for(task: Any) -> TaskContext:
    """The TaskContext the worker set for this task, or a new one."""
    ctx = peek()
    if ctx is not None and ctx.task_id == str(task.request.id):
        return ctx
    return TaskContext.from_task(task)


_local = threading.local()
# Every task running in this process, for the drain to fire their hooks.
_running: dict[str, tuple[TaskContext, Limits]] = {}


def begin(task: Any) -> None:
    """Before a task runs (task_prerun, in the executing thread): set its TaskContext and, for
    a sync task with limits, start its watchdog (async tasks are guarded on the loop)."""
    ctx = TaskContext.from_task(task)
    token = set_current(ctx)
    watchdog = None
    limits = task_limits(task)
    _running[ctx.task_id] = (ctx, limits)
    if not is_async(task) and limits:
        relier = runtime.of(task.app)
        watchdog = Watchdog(ctx, limits, relier is None or relier.hard_limit_enforced)
        watchdog.start()
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append((token, watchdog))


def end() -> None:
    """After the task ran (task_postrun): stop its watchdog, restore the context."""
    stack = getattr(_local, "stack", None)
    if not stack:
        return
    token, watchdog = stack.pop()
    if watchdog is not None:
        watchdog.stop()
    ctx = peek()
    if ctx is not None:
        _running.pop(ctx.task_id, None)
    reset_current(token)


def fire_drain_hooks() -> int:
    """The drain window ended with these tasks still running here: run their soft-timeout
    hooks now (they are about to be handed off). Return how many hooks ran."""
    fired = 0
    for ctx, limits in list(_running.values()):
        if limits.hook is None:
            continue
        _report(ctx, "soft", "is still running at the end of its worker's drain; hook runs")
        run_hook(limits.hook, ctx)
        fired += 1
    return fired


def install_drain_hook_signal() -> None:
    """In a prefork pool process: SIGUSR2 from the main process runs the drain hooks (in a
    thread, not in the signal handler)."""
    import signal

    def handler(signum: int, frame: Any) -> None:
        threading.Thread(target=fire_drain_hooks, name="relier-drain-hooks", daemon=True).start()

    signal.signal(signal.SIGUSR2, handler)


def _report(ctx: TaskContext, kind: str, message: str) -> None:
    events.emit(
        events.TASK_TIMEOUT,
        f"{ctx.name}[{ctx.task_id}] {message}",
        task_id=ctx.task_id,
        task_name=ctx.name,
        timeout_type=kind,
    )


def run_hook(hook: Callable[[TaskContext], Any] | None, ctx: TaskContext) -> None:
    """Run a sync hook (or an async one, on the persistent loop); report, never raise."""
    if hook is None:
        return
    try:
        result = hook(ctx)
        if inspect.isawaitable(result):
            run(_awaited(result))
    except Exception as exc:
        events.emit(
            events.TASK_TIMEOUT_HOOK_FAILED,
            f"{ctx.name}[{ctx.task_id}] on_soft_timeout raised {exc!r}; the task goes on",
            task_id=ctx.task_id,
            task_name=ctx.name,
        )


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


class Watchdog:
    """Soft (and, where nothing else can, hard) deadline timers for one sync task."""

    def __init__(self, ctx: TaskContext, limits: Limits, hard_enforced: bool = True) -> None:
        self.ctx = ctx
        self.limits = limits
        self.hard_enforced = hard_enforced
        self._timers: list[threading.Timer] = []

    def start(self) -> None:
        started = time.time()
        if self.limits.soft is not None:
            self._arm(self.limits.soft, self._soft)
        if self.limits.hard is not None:
            self.ctx.deadline = started + self.limits.hard
            if not self.hard_enforced:
                self._arm(self.limits.hard, self._hard_unenforceable)

    def _arm(self, seconds: float, fn: Callable[[], None]) -> None:
        timer = threading.Timer(seconds, fn)
        timer.daemon = True
        timer.start()
        self._timers.append(timer)

    def _soft(self) -> None:
        _report(self.ctx, "soft", f"passed its soft timeout ({self.limits.soft} s); hook runs")
        run_hook(self.limits.hook, self.ctx)

    def _hard_unenforceable(self) -> None:
        _report(
            self.ctx,
            "hard",
            f"passed its hard timeout ({self.limits.hard} s) but is a sync task in a pool "
            "where it cannot be interrupted (threads/solo): it keeps running. Use the prefork "
            "pool or an async task for enforced hard timeouts",
        )

    def stop(self) -> None:
        for timer in self._timers:
            timer.cancel()


async def guard(coro: Coroutine[Any, Any, T], ctx: TaskContext, limits: Limits) -> T:
    """Run an async task's coroutine under its soft and hard deadlines."""
    loop = asyncio.get_running_loop()
    soft_handle = None
    if limits.soft is not None:

        def soft() -> None:
            _report(ctx, "soft", f"passed its soft timeout ({limits.soft} s); hook runs")
            # A sync hook must not block the loop the task runs on.
            loop.run_in_executor(None, run_hook, limits.hook, ctx)

        soft_handle = loop.call_later(limits.soft, soft)
    try:
        if limits.hard is None:
            return await coro
        ctx.deadline = time.time() + limits.hard
        deadline = asyncio.timeout(limits.hard)
        try:
            async with deadline:
                return await coro
        except TimeoutError:
            if not deadline.expired():
                raise  # the task's own TimeoutError, not ours
            _report(ctx, "hard", f"passed its hard timeout ({limits.hard} s); cancelled")
            raise HardTimeout(
                f"{ctx.name}[{ctx.task_id}] ran past its hard_timeout of {limits.hard} s and was "
                "cancelled"
            ) from None
    finally:
        if soft_handle is not None:
            soft_handle.cancel()
