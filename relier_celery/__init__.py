"""relier_celery: when your worker dies, your tasks come back.

Enable it by configuration alone: add ``"relier_celery"`` to the app's ``imports`` and set
``relier_*`` keys. Publishers that never load ``imports`` call :func:`install` once.
"""

from __future__ import annotations

from relier_celery.core.errors import (
    AdmissionRejected,
    AdmissionUnavailable,
    ConfigError,
    HardTimeout,
    IdempotencyBusy,
    IdempotencyConflict,
    IdempotencyError,
    IdempotencyInterrupted,
    RecordRefused,
    RelierError,
    StoreUnavailable,
)
from relier_celery.core.version import __version__
from relier_celery.features.context import TaskContext
from relier_celery.features.idempotency import idempotency_lock
from relier_celery.recovery.schema import migration
from relier_celery.wiring.install import install
from relier_celery.wiring.signals import connect as _connect
from relier_celery.wiring.task_methods import rl_task

__all__ = [
    "AdmissionRejected",
    "AdmissionUnavailable",
    "ConfigError",
    "HardTimeout",
    "IdempotencyBusy",
    "IdempotencyConflict",
    "IdempotencyError",
    "IdempotencyInterrupted",
    "RecordRefused",
    "RelierError",
    "StoreUnavailable",
    "TaskContext",
    "__version__",
    "idempotency_lock",
    "install",
    "migration",
    "rl_task",
]

_connect()
