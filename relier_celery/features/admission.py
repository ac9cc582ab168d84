"""Admission control: refuse a dispatch before it is published, with a Retry-After.

A task declares a rate (``@app.task(admission="100/s", admission_burst=50)``), a queue gets one
in ``relier_admission = {"emails": "10/s"}``, a caller scopes the task's rate to its own key
(``task.push(..., admission_key="tenant-7")``), and ``max_queue_depth`` bounds the broker queue.
Every dispatch of such a task (``push``, ``apush``, ``apply_async``, ``delay``, a group or a
chain step) is decided by one EVALSHA of ``scripts/admit.lua`` (GCRA on the Redis clock) before
anything is published; a refusal raises :class:`AdmissionRejected` with ``retry_after`` in
seconds. Celery's own retries and relier's republishing (resurrection, hand-off and the
consumer-restart republish all go through ``TaskRecord.publish``, a raw kombu publish that
never reaches ``apply_async``) are never refused: that work was admitted once already.

When Redis (or the broker, for a depth bound) cannot be reached the decision fails closed with
:class:`AdmissionUnavailable`, or lets the dispatch through with an ``admission.fail_open``
event when ``relier_admission_fail_open = True``.
"""

from __future__ import annotations

import contextvars
import functools
import math
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from relier_celery import runtime
from relier_celery.core import events
from relier_celery.core.errors import (
    AdmissionRejected,
    AdmissionUnavailable,
    ConfigError,
    StoreUnavailable,
)
from relier_celery.core.keys import caller_key
from relier_celery.core.rates import (
    Limit,
    QueueRule,
    Rate,
    parse_depth,
    parse_limit,
    parse_queue_rules,
    parse_rate,
)

__all__ = [
    "Limit",
    "QueueRule",
    "Rate",
    "admit",
    "guard_apply_async",
    "parse_limit",
    "parse_queue_rules",
    "parse_rate",
    "retry_after_header",
    "validate_task",
]

# A depth refusal has no arrival arithmetic to say when room comes back: callers are asked to
# wait this long, about the time a worker takes to drain a few messages.
DEPTH_RETRY_AFTER = 1.0


@dataclass(frozen=True)
class _TaskRule:
    limit: Limit | None
    max_queue_depth: int | None


# The task options this feature reads (wiring/task_options.py checks every task's against all).
TASK_OPTIONS = ("admission", "admission_burst", "max_queue_depth")


def validate_task(name: str, task: Any) -> None:
    """Raise :class:`ConfigError` for a bad ``admission``, ``admission_burst`` or
    ``max_queue_depth`` option of a task (run at worker start and at first dispatch)."""
    _task_rule(type(task), name)


def _task_rule(cls: type, name: str) -> _TaskRule:
    cached = _rules.get(cls)
    if cached is not None:
        return cached
    rate = getattr(cls, "admission", None)
    burst = getattr(cls, "admission_burst", None)
    where = f"task {name!r}: admission"
    if rate is None and burst is not None:
        raise ConfigError(f"task {name!r}: admission_burst needs an admission rate, e.g. '100/s'")
    limit = None if rate is None else parse_limit(rate, burst, where)
    rule = _TaskRule(
        limit, parse_depth(getattr(cls, "max_queue_depth", None), f"task {name!r}: max_queue_depth")
    )
    with _lock:
        _rules[cls] = rule
    return rule


_lock = threading.Lock()
_rules: weakref.WeakKeyDictionary[type, _TaskRule] = weakref.WeakKeyDictionary()
_queue_rules: weakref.WeakKeyDictionary[Any, dict[str, QueueRule]] = weakref.WeakKeyDictionary()
# Set while push() publishes what it already admitted, so apply_async does not count it twice.
_admitted: contextvars.ContextVar[bool] = contextvars.ContextVar("relier_admitted", default=False)


def _validate_key(key: Any) -> str:
    return caller_key(key, "admission_key", ConfigError)


def admit(
    task: Any,
    args: Any = None,
    kwargs: Any = None,
    options: Mapping[str, Any] | None = None,
    key: str | None = None,
) -> None:
    """Decide one dispatch of ``task``; return if admitted, raise :class:`AdmissionRejected` if
    refused, :class:`AdmissionUnavailable` if undecidable and failing closed."""
    options = options or {}
    rule = _task_rule(type(task), task.name)
    if key is not None:
        key = _validate_key(key)
        if rule.limit is None:
            raise ConfigError(
                f"admission_key={key!r} given for task {task.name!r}, which has no admission "
                "rate to scope: declare one, e.g. @app.task(admission='10/s')"
            )
    app = task.app
    queues = _queue_rules_of(app)
    if rule.limit is None and rule.max_queue_depth is None and not queues:
        return
    if app.conf.task_always_eager:
        return  # nothing goes through the broker
    relier = runtime.of(app) or runtime.install(app)
    queue = _queue_of(task, args, kwargs, options) if queues or rule.max_queue_depth else None
    qrule = queues.get(queue) if queue is not None else None
    buckets: list[tuple[str, int, int]] = []
    limits: list[tuple[Limit, str]] = []
    if rule.limit is not None:
        buckets.append((relier.store.keys.admission_task(task.name, key), *_gcra(rule.limit)))
        limits.append((rule.limit, "task"))
    if qrule is not None and qrule.limit is not None and queue is not None:
        buckets.append((relier.store.keys.admission_queue(queue), *_gcra(qrule.limit)))
        limits.append((qrule.limit, "queue"))
    bound = min(
        (d for d in (rule.max_queue_depth, qrule.max_queue_depth if qrule else None) if d),
        default=None,
    )
    if not buckets and bound is None:
        return
    try:
        if bound is not None and queue is not None:
            depth = _broker_depth(app, queue)
            if depth >= bound:
                _reject(
                    f"queue {queue!r} holds {depth} message(s), at or above max_queue_depth="
                    f"{bound}",
                    retry_after=DEPTH_RETRY_AFTER,
                    limit=bound,
                    reset=DEPTH_RETRY_AFTER,
                    reason="queue_depth",
                    task_name=task.name,
                    key=key,
                    queue=queue,
                )
        if not buckets:
            return
        allowed, retry_ms, _remaining, reset_ms, refusing = relier.store.admit(buckets)
    except StoreUnavailable as exc:
        if not relier.config.admission_fail_open:
            raise AdmissionUnavailable(
                f"admission control for {task.name!r} cannot decide ({exc}); nothing was "
                "published. Set relier_admission_fail_open = True to publish anyway."
            ) from exc
        events.emit(
            events.ADMISSION_FAIL_OPEN,
            f"{task.name} published without an admission decision: {exc}",
            task_name=task.name,
            key=key,
            queue=queue,
        )
        return
    if allowed:
        return
    limit, scope = limits[refusing - 1]
    _reject(
        f"{task.name} refused by the {scope} limit {limit.rate.text} (burst {limit.burst})"
        + (f" of queue {queue!r}" if scope == "queue" else "")
        + (f" for key {key!r}" if key is not None and scope == "task" else "")
        + f": retry after {retry_ms / 1000:.3f} s",
        retry_after=retry_ms / 1000,
        limit=limit.burst,
        reset=reset_ms / 1000,
        reason="rate",
        rate=limit.rate.text,
        task_name=task.name,
        key=key,
        queue=queue,
    )


def _gcra(limit: Limit) -> tuple[int, int]:
    return limit.rate.interval_us, limit.burst


def _reject(message: str, **info: Any) -> None:
    error = AdmissionRejected(message, **info)
    events.emit(
        events.ADMISSION_REJECTED,
        message,
        task_name=error.task_name,
        key=error.key,
        queue=error.queue,
        reason=error.reason,
        retry_after=error.retry_after,
    )
    raise error


def _queue_rules_of(app: Any) -> dict[str, QueueRule]:
    rules = _queue_rules.get(app)
    if rules is None:
        raw = app.conf.get("relier_admission") or {}
        rules = parse_queue_rules(raw) if isinstance(raw, Mapping) else {}
        with _lock:
            _queue_rules[app] = rules
    return rules


def _queue_of(task: Any, args: Any, kwargs: Any, options: Mapping[str, Any]) -> str:
    """The queue Celery will publish this dispatch to: the ``queue`` option, the task's own,
    ``task_routes``, or the default queue."""
    queue = options.get("queue") or getattr(task, "queue", None)
    if queue is None:
        routed = task.app.amqp.router.route(dict(options), task.name, args, kwargs, task_type=task)
        queue = routed.get("queue")
    if queue is None:
        return str(task.app.conf.task_default_queue)
    return queue if isinstance(queue, str) else str(queue.name)


def _broker_depth(app: Any, queue: str) -> int:
    """Messages waiting in ``queue`` on the broker. With kombu's Redis transport that is the
    LLEN of the list named after the queue plus its priority sub-lists (``queue\\x06\\x163``...),
    which ``queue_declare(passive=True)`` sums; a queue never declared is empty."""
    from kombu.exceptions import OperationalError

    try:
        with app.pool.acquire(block=True, timeout=5) as conn:
            try:
                declared = conn.default_channel.queue_declare(queue=queue, passive=True)
            except conn.channel_errors:
                return 0  # NOT_FOUND: no such queue yet
            except conn.connection_errors as exc:
                raise OperationalError(str(exc)) from exc
            return int(declared.message_count)
    except OperationalError as exc:  # kombu's "cannot reach the broker", after its retries
        raise StoreUnavailable(f"cannot read the depth of queue {queue!r}: {exc}") from exc


@contextmanager
def already_admitted() -> Iterator[None]:
    """Publish what :func:`admit` already decided without deciding again."""
    token = _admitted.set(True)
    try:
        yield
    finally:
        _admitted.reset(token)


def guard_apply_async(apply_async: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``Task.apply_async`` so ``delay``/``apply_async``/groups/chains are admitted too.

    Celery's ``before_task_publish`` signal cannot do this: Celery logs and swallows what its
    receivers raise, and publishes anyway. Retries (``retries`` option, set by ``Task.retry``)
    pass: refusing one inside a worker would lose the task."""

    @functools.wraps(apply_async)
    def apply_async_admitted(
        self: Any, args: Any = None, kwargs: Any = None, *rest: Any, **options: Any
    ) -> Any:
        key = options.pop("admission_key", None)
        if not _admitted.get() and not options.get("retries"):
            admit(self, args, kwargs, options, key)
        return apply_async(self, args, kwargs, *rest, **options)

    apply_async_admitted._relier_admission = True  # type: ignore[attr-defined]
    return apply_async_admitted


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` as HTTP wants it: whole seconds, rounded up, at least 1 when refused."""
    return str(max(1, math.ceil(seconds)))
