"""What identifies a delivery: its delivery id (the task id and relier's publication id) and,
within it, its :class:`Generation`; and the small readers of message headers every layer
shares (a count, the trace context). Pure.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from relier_celery.core.headers import NESTING_HEADER, PUBLICATION_HEADER, RESURRECTIONS_HEADER

__all__ = ["Generation", "as_int", "delivery_id", "new_publication_id", "trace_context"]


@dataclass(frozen=True, order=True)
class Generation:
    """Which delivery of one publication (:func:`delivery_id`) this is: relier's
    resurrections raise ``resurrections`` (Celery's ``retries`` is compared first; a retry is
    also a new publication). A delivery older than or equal to one already held or finished
    is a duplicate."""

    retries: int = 0
    resurrections: int = 0

    def field(self, delivery: str) -> str:
        """The held field of this generation of a delivery id (receipt path)."""
        return f"{delivery}|{self.retries}|{self.resurrections}"

    @classmethod
    def from_headers(cls, headers: dict[str, Any]) -> Generation:
        return cls(as_int(headers.get("retries")), as_int(headers.get(RESURRECTIONS_HEADER)))


def new_publication_id() -> str:
    """A fresh publication id (64 random bits, hex: unique enough among the publications of
    one task id, and cheap on every publish)."""
    return secrets.token_hex(8)


def delivery_id(headers: Any, task_id: str) -> str:
    """What identifies one publication of a task: the task id and relier's publication id.

    Deliveries of one publication (broker redeliveries, relier's resurrections) share it and
    are ordered by their :class:`Generation`; a new publication under the same task id (a
    replacement, a re-applied frozen signature) is another delivery id, so it is never taken
    for a duplicate. A message published without relier (no ``rl_pub``) falls back on the
    task id and Celery's ``replaced_task_nesting``, so that at least a replacement runs.
    """
    pub = headers.get(PUBLICATION_HEADER) if isinstance(headers, dict) else None
    if pub:
        return f"{task_id}#{pub}"
    nesting = as_int(headers.get(NESTING_HEADER)) if isinstance(headers, dict) else 0
    return f"{task_id}#r{nesting}" if nesting else task_id


def trace_context(headers: Any) -> dict[str, str]:
    """The W3C trace context (``traceparent``, ``tracestate``) of a task message's headers,
    where opentelemetry-instrumentation-celery puts it; events carry it so an exporter can
    link them to the task's trace."""
    if not isinstance(headers, dict):
        return {}
    return {k: str(headers[k]) for k in ("traceparent", "tracestate") if headers.get(k)}


def as_int(value: Any) -> int:
    """A count from a header or a Redis reply: 0 when missing, negative or not a number."""
    try:
        return max(int(value or 0), 0)
    except (TypeError, ValueError):
        return 0
