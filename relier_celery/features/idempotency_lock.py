"""The idempotency key and its lock: the key of a call (canonical JSON of the task name and
arguments, or the caller's own), and :class:`IdempotencyLock`, the claim on a key that lets a
side effect happen at most once per key (``idem_claim.lua``, ``idem_store.lua``,
``idem_release.lua``). idempotency.py wraps idempotent tasks in it; ``idempotency_lock``
gives it to any code.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from types import TracebackType
from typing import Any

from relier_celery import runtime
from relier_celery.core import events
from relier_celery.core.errors import (
    IdempotencyBusy,
    IdempotencyConflict,
    IdempotencyError,
    IdempotencyInterrupted,
)
from relier_celery.core.keys import caller_key
from relier_celery.store.client import Store

__all__ = [
    "DEFAULT_TTL",
    "DEFAULT_WAIT",
    "POLL",
    "IdempotencyLock",
    "args_hash",
    "canonical",
    "default_key",
    "idempotency_lock",
    "validate_key",
]

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
                events.IDEMPOTENCY_HIT,
                f"key {self.key!r} already done; result reused",
                idempotency_key=self.key,
            )
        elif kind == "conflict":
            events.emit(
                events.IDEMPOTENCY_CONFLICT,
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
                events.IDEMPOTENCY_INTERRUPTED,
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
                events.IDEMPOTENCY_TAKEOVER if self.taken_over else events.IDEMPOTENCY_CLAIMED,
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
                events.IDEMPOTENCY_FENCED,
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

    relier = runtime.install(app or current_app._get_current_object())
    return IdempotencyLock(relier.store, key, ttl, claim_ttl)
