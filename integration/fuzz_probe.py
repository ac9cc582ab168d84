"""Imported by the worker (``imports``) in the malformed-message tests: records, in Redis, what
Celery did with each message, so a test can account for every one it published.

``test:ran`` counts task executions that reached the task's tracer (whatever the outcome);
``test:rejected`` / ``test:unknown`` count Celery's own rejections in the consumer. The keys
hold ``repr(task_id)``, since a malformed message's id may be anything.
"""

from __future__ import annotations

from typing import Any

from celery.signals import task_postrun, task_rejected, task_unknown
from chaos_app import r


@task_postrun.connect(weak=False)
def _ran(task_id: Any = None, **_: Any) -> None:
    r().rpush("test:ran", repr(task_id))


@task_rejected.connect(weak=False)
def _rejected(message: Any = None, exc: Any = None, **_: Any) -> None:
    headers = getattr(message, "headers", None)
    task_id = headers.get("id") if isinstance(headers, dict) else None
    r().rpush("test:rejected", f"{task_id!r} {exc!r}"[:500])


@task_unknown.connect(weak=False)
def _unknown(id: Any = None, name: Any = None, **_: Any) -> None:
    r().rpush("test:unknown", f"{id!r} {name!r}"[:500])
