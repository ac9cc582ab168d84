"""relier_celery: when your worker dies, your tasks come back.

Enable it by configuration alone: add ``"relier_celery"`` to the app's ``imports`` and set
``relier_*`` keys. Publishers that never load ``imports`` call :func:`install` once.
"""

from __future__ import annotations

from .context import TaskContext
from .dispatch import rl_task
from .envelope import migration
from .errors import (
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
from .idempotency import idempotency_lock
from .plugin import install
from .signals import connect as _connect

__version__ = "0.1.0"

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
