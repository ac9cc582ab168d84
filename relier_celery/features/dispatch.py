"""``.push()`` / ``.apush()``, which the wiring gives every task (wiring/task_methods.py).

``push(*args, **kwargs)`` is ``apply_async`` with the task's arguments written naturally;
keyword arguments that are Celery dispatch options (``countdown``, ``queue``, ``headers``...)
are taken as options, the rest are the task's. ``apush`` does the same from async code without
blocking the event loop: kombu's publish is blocking I/O, so it runs in the loop's executor.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

__all__ = ["DISPATCH_OPTIONS", "apush", "push", "split_options"]

# Keyword arguments of push()/apush() that are Celery's apply_async options, not task kwargs.
DISPATCH_OPTIONS = frozenset(
    {
        "countdown",
        "eta",
        "expires",
        "queue",
        "exchange",
        "routing_key",
        "priority",
        "headers",
        "task_id",
        "link",
        "link_error",
        "retry",
        "retry_policy",
        "serializer",
        "compression",
        "shadow",
        "time_limit",
        "soft_time_limit",
        "ignore_result",
        "add_to_parent",
        "connection",
        "producer",
        "publisher",
        "chain",
        "group_id",
        "group_index",
        "chord",
        "reply_to",
        "idempotency_key",
        "admission_key",
    }
)


def split_options(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split push() keyword arguments into (task kwargs, dispatch options)."""
    options = {k: v for k, v in kwargs.items() if k in DISPATCH_OPTIONS}
    task_kwargs = {k: v for k, v in kwargs.items() if k not in DISPATCH_OPTIONS}
    return task_kwargs, options


def push(self: Any, *args: Any, **kwargs: Any) -> Any:
    """Dispatch this task (sync): ``task.push(1, 2, countdown=5)``; returns an AsyncResult.
    ``idempotency_key="order-42"`` sets the key its duplicates are recognised by;
    ``admission_key="tenant-7"`` scopes the task's admission rate to that caller, and a refusal
    raises AdmissionRejected before anything is published."""
    from relier_celery.features.admission import admit, already_admitted

    task_kwargs, options = split_options(kwargs)
    key = options.pop("idempotency_key", None)
    if key is not None:
        from relier_celery.core.headers import IDEMPOTENCY_HEADER
        from relier_celery.features.idempotency import validate_key

        options["headers"] = {
            **(options.get("headers") or {}),
            IDEMPOTENCY_HEADER: validate_key(key),
        }
    admit(self, args, task_kwargs, options, options.pop("admission_key", None))
    with already_admitted():
        return self.apply_async(args, task_kwargs, **options)


async def apush(self: Any, *args: Any, **kwargs: Any) -> Any:
    """Dispatch this task from async code without blocking the event loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, functools.partial(self.push, *args, **kwargs))
