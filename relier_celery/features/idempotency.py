"""Idempotency: a task's side effect happens at most once per key.

One Lua script claims a key or reads what it holds (``idem_claim.lua``): no record -> claimed
(in flight, with a fresh fencing token); a stored result -> returned at once and the task body
is skipped; in flight under a live owner -> the duplicate does not run (it waits a bounded time
for the result, then is retried later); in flight under a dead owner (its worker's lease ran
out, or the same task id claiming again after a hard time limit killed its attempt) -> taken
over, so the run is repeated. A failed run releases the claim so a retry can run; a
stale owner can never store over a newer owner's result (fencing).

What a crash means. Relier stores the result right after the body returns, so a duplicate,
retry, redelivery or resurrection of a *finished* run never repeats it. An owner killed *during*
its run leaves no way to know whether its side effect happened: by default
(``idempotency_on_crash="rerun"``) the run is repeated, which suits bodies that pass
``TaskContext.current().idempotency_key`` on to the system they change or that check for their
own effect; with ``"quarantine"`` the delivery goes to the DLQ instead (reason
``idempotency_interrupted``) and every later duplicate too, until an operator releases it, so
the side effect never happens twice unasked.

The key is, in order: the ``idempotency_key`` dispatch header, the task's ``idempotency_key``
option (a callable over the arguments, or ``"task_id"``), or by default a SHA-256 of the task
name and its arguments in canonical JSON, stable across processes and Python versions. A key
reused with other arguments is an :class:`IdempotencyConflict`, as with Stripe's keys.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from relier_celery import runtime
from relier_celery.core import events
from relier_celery.core.errors import (
    ConfigError,
    IdempotencyBusy,
    IdempotencyError,
    StoreUnavailable,
)
from relier_celery.core.headers import IDEMPOTENCY_HEADER, RERUN_HEADER
from relier_celery.features.idempotency_lock import (
    DEFAULT_TTL,
    DEFAULT_WAIT,
    POLL,
    IdempotencyLock,
    args_hash,
    default_key,
    idempotency_lock,
    validate_key,
)

__all__ = [
    "IdempotencyLock",
    "args_hash",
    "default_key",
    "guarded",
    "idempotency_lock",
    "key_for",
    "validate_key",
]

ON_CRASH = ("rerun", "quarantine")
# The task options this feature reads (wiring/task_options.py checks every task's against all).
TASK_OPTIONS = (
    "idempotent",
    "idempotency_key",
    "idempotency_ttl",
    "idempotency_wait",
    "idempotency_on_crash",
)


def validate_task(name: str, task: Any) -> None:
    """Raise :class:`ConfigError` for a bad ``idempotency_on_crash`` of a task."""
    on_crash = getattr(task, "idempotency_on_crash", None)
    if on_crash is not None and on_crash not in ON_CRASH:
        raise ConfigError(
            f"task {name!r}: idempotency_on_crash must be 'rerun' or 'quarantine', got {on_crash!r}"
        )


def key_for(task: Any, args: Any, kwargs: Any) -> str:
    """The idempotency key of one call of ``task`` (see the module docstring for the order)."""
    request = task.request
    headers = getattr(request, "headers", None) or {}
    explicit = headers.get(IDEMPOTENCY_HEADER) or getattr(request, IDEMPOTENCY_HEADER, None)
    if explicit:
        return validate_key(explicit)
    option = getattr(type(task), "idempotency_key", None)
    if option == "task_id":
        return validate_key(f"{task.name}:{request.id}")
    if callable(option):
        return validate_key(option(*args, **kwargs))
    return default_key(task.name, args, kwargs)


def guarded(task: Any, call: Callable[[], Any]) -> Any:
    from relier_celery.features.context import peek

    args, kwargs = tuple(task.request.args or ()), dict(task.request.kwargs or {})

    relier = runtime.install(task.app)
    key = key_for(task, args, kwargs)
    ctx = peek()
    if ctx is not None:
        ctx.idempotency_key = key
    ttl = float(getattr(task, "idempotency_ttl", None) or DEFAULT_TTL)
    wait = float(getattr(task, "idempotency_wait", None) or DEFAULT_WAIT)
    on_crash = getattr(task, "idempotency_on_crash", None) or "rerun"
    if on_crash == "quarantine" and (getattr(task.request, "headers", None) or {}).get(
        RERUN_HEADER
    ):
        on_crash = "approved"
    lock = IdempotencyLock(
        relier.store,
        key,
        ttl,
        claim_ttl=ttl,
        lease=relier.worker_id,
        owner=str(task.request.id),
        fingerprint=args_hash(args, kwargs),
        on_crash=on_crash,
    )
    deadline = time.monotonic() + wait
    while True:
        try:
            lock.acquire()
            break
        except IdempotencyBusy:
            if time.monotonic() > deadline:
                raise task.retry(countdown=min(wait, 30.0), max_retries=None) from None
            time.sleep(POLL)
        except StoreUnavailable as exc:
            # Never run unprotected: fail loudly, and let Celery retry (its max_retries bound).
            events.emit(
                events.IDEMPOTENCY_UNAVAILABLE,
                f"key {key!r}: Redis unavailable ({exc}); the task does not run unprotected "
                "and is retried",
                idempotency_key=key,
                task_id=str(task.request.id),
            )
            countdown = min(2.0 ** int(task.request.retries or 0), 60.0)
            raise task.retry(exc=exc, countdown=countdown) from None
    if lock.already_executed:
        return lock.cached_result
    try:
        result = call()
    except BaseException:
        lock.release()
        raise
    try:
        lock.store(result)
    except IdempotencyError:
        lock.release()
        raise
    except StoreUnavailable as exc:
        # The side effect happened; running it again would repeat it. Say so, and return.
        events.emit(
            events.IDEMPOTENCY_STORE_FAILED,
            f"key {key!r}: the run finished but its result could not be kept ({exc}); "
            "duplicates wait for the claim to expire (idempotency_ttl) before running",
            idempotency_key=key,
            task_id=str(task.request.id),
        )
    return result
