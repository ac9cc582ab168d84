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

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any

from relier_celery.core import events
from relier_celery.core.errors import (
    IdempotencyBusy,
    IdempotencyConflict,
    IdempotencyError,
    IdempotencyInterrupted,
    StoreUnavailable,
)
from relier_celery.core.keys import caller_key
from relier_celery.store.client import Store

__all__ = [
    "HEADER",
    "IdempotencyLock",
    "args_hash",
    "default_key",
    "idempotency_lock",
    "make_idempotent",
    "validate_key",
]

HEADER = "idempotency_key"
# Set by a DLQ release: the operator approves repeating an interrupted run.
RERUN_HEADER = "rl_rerun_interrupted"
ON_CRASH = ("rerun", "quarantine")
# Defaults: results are kept an hour; a duplicate waits up to 30 s for the running copy.
DEFAULT_TTL = 3600.0
DEFAULT_WAIT = 30.0
POLL = 0.1


def canonical(args: Any, kwargs: Any) -> str:
    """Canonical JSON of a call's arguments (sorted keys, no spaces)."""
    try:
        return json.dumps(
            [list(args), kwargs],
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
            allow_nan=False,
        )
    except (TypeError, ValueError) as exc:
        raise IdempotencyError(
            f"arguments are not JSON values ({exc}): give the task an idempotency_key "
            "callable or a dispatch-time idempotency_key"
        ) from None


def args_hash(args: Any, kwargs: Any) -> str:
    return hashlib.sha256(canonical(args, kwargs).encode()).hexdigest()


def default_key(task_name: str, args: Any, kwargs: Any) -> str:
    """The default key: the task name and a hash of its canonical arguments."""
    return f"{task_name}:{args_hash(args, kwargs)}"


def validate_key(key: Any) -> str:
    return caller_key(key, "an idempotency key", IdempotencyError)


def _serialize(result: Any, what: str) -> str:
    try:
        return json.dumps(result, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise IdempotencyError(
            f"the result of {what} is not a JSON value ({exc}), so it cannot be stored for "
            "its duplicates; the claim was released"
        ) from None


class IdempotencyLock:
    """Claim a key for custom code; ``with`` or ``async with``.

    ::

        with idempotency_lock("webhook-42", app=app) as lock:
            if lock.already_executed:
                return lock.cached_result
            result = handle()
            lock.store(result)

    A key in flight elsewhere raises :class:`IdempotencyBusy`. Leaving the block without
    ``store`` (or by an exception) releases the claim.
    """

    def __init__(
        self,
        store: Store,
        key: str,
        ttl: float,
        claim_ttl: float,
        lease: str = "",
        owner: str = "",
        fingerprint: str = "",
        on_crash: str = "rerun",
    ) -> None:
        self._store = store
        self.key = validate_key(key)
        self.ttl = ttl
        self.claim_ttl = claim_ttl
        self.lease = lease
        # A lock's owner is unique: the claim script lets a claim by the same owner (the same
        # task id, after a hard time limit killed its earlier attempt) take over.
        self.owner = owner or f"lock:{uuid.uuid4().hex}"
        self.fingerprint = fingerprint or "-"
        self.on_crash = on_crash
        self.already_executed = False
        self.cached_result: Any = None
        self.taken_over = False
        self._token: str | None = None
        self._stored = False

    def acquire(self) -> IdempotencyLock:
        out = self._store.idem_claim(
            self.key, self.lease, self.owner, self.fingerprint, self.claim_ttl, self.on_crash
        )
        kind = out[0]
        if kind == "done":
            self.already_executed = True
            self.cached_result = json.loads(out[1])
            events.emit(
                "idempotency.hit",
                f"key {self.key!r} already done; result reused",
                idempotency_key=self.key,
            )
        elif kind == "conflict":
            events.emit(
                "idempotency.conflict",
                f"key {self.key!r} reused with other arguments",
                idempotency_key=self.key,
            )
            raise IdempotencyConflict(
                f"idempotency key {self.key!r} was first used with other arguments: use a new "
                "key for a different request"
            )
        elif kind == "busy":
            raise IdempotencyBusy(f"idempotency key {self.key!r} is running now ({out[1]})")
        elif kind == "interrupted":
            events.emit(
                "idempotency.interrupted",
                f"key {self.key!r}: its owner {out[1]} died mid-run; not repeated without an "
                "operator's release",
                idempotency_key=self.key,
            )
            raise IdempotencyInterrupted(
                f"idempotency key {self.key!r}: its run by {out[1]} was interrupted by a crash "
                "and its side effect may have happened; check it, then release the DLQ entry "
                "to run it again"
            )
        else:
            self._token = str(out[1])
            self.taken_over = bool(int(out[2]))
            events.emit(
                "idempotency.takeover" if self.taken_over else "idempotency.claimed",
                f"key {self.key!r} claimed" + (" from a dead owner" if self.taken_over else ""),
                idempotency_key=self.key,
            )
        return self

    def store(self, result: Any) -> bool:
        """Keep ``result`` for the key's duplicates; False if this claim was fenced out."""
        if self._token is None:
            raise IdempotencyError("store() needs a claim: the key was already executed")
        data = _serialize(result, f"idempotency key {self.key!r}")
        self._stored = True
        stored = self._store.idem_store(self.key, self._token, data, self.ttl)
        if not stored:
            events.emit(
                "idempotency.fenced",
                f"key {self.key!r}: a newer owner holds it; this result was not kept",
                idempotency_key=self.key,
            )
        return stored

    def release(self) -> None:
        if self._token is not None and not self._stored:
            self._store.idem_release(self.key, self._token)

    def __enter__(self) -> IdempotencyLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    async def __aenter__(self) -> IdempotencyLock:
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(None, self.acquire)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        import asyncio

        await asyncio.get_running_loop().run_in_executor(None, self.release)


def idempotency_lock(
    key: str, ttl: float = DEFAULT_TTL, *, app: Any = None, claim_ttl: float = 300.0
) -> IdempotencyLock:
    """An :class:`IdempotencyLock` on ``key`` in ``app``'s relier store (the current app if
    None). An in-flight claim lives ``claim_ttl`` seconds unless stored or released."""
    from celery import current_app

    from relier_celery.wiring.install import install

    relier = install(app or current_app._get_current_object())
    return IdempotencyLock(relier.store, key, ttl, claim_ttl)


def make_idempotent(task: Any) -> bool:
    """Wrap an ``idempotent=True`` task's run (after aio.make_sync). Idempotent."""
    from relier_celery.features.aio import wrap_run

    if not getattr(task, "idempotent", False):
        return False
    return wrap_run(
        task,
        "__relier_idempotent__",
        lambda fn: True,
        lambda instance, call: _guarded(instance, call),
    )


def key_for(task: Any, args: Any, kwargs: Any) -> str:
    """The idempotency key of one call of ``task`` (see the module docstring for the order)."""
    request = task.request
    headers = getattr(request, "headers", None) or {}
    explicit = headers.get(HEADER) or getattr(request, HEADER, None)
    if explicit:
        return validate_key(explicit)
    option = getattr(type(task), "idempotency_key", None)
    if option == "task_id":
        return validate_key(f"{task.name}:{request.id}")
    if callable(option):
        return validate_key(option(*args, **kwargs))
    return default_key(task.name, args, kwargs)


def _guarded(task: Any, call: Callable[[], Any]) -> Any:
    from relier_celery.features.context import peek
    from relier_celery.wiring.install import current_worker_id, install

    args, kwargs = tuple(task.request.args or ()), dict(task.request.kwargs or {})

    relier = install(task.app)
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
        lease=current_worker_id(),
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
                "idempotency.unavailable",
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
            "idempotency.store_failed",
            f"key {key!r}: the run finished but its result could not be kept ({exc}); "
            "duplicates wait for the claim to expire (idempotency_ttl) before running",
            idempotency_key=key,
            task_id=str(task.request.id),
        )
    return result
