"""The one entry point to Redis: :class:`Store`, relier's state under one key prefix.

The commands live in one module per feature (leases, registry, idempotency, admission,
progress, visibility, dlq), each a class over the shared :class:`Connection`; ``Store`` is all
of them. Everything relier keeps in Redis goes through this package.
"""

from __future__ import annotations

from relier_celery.store.admission import AdmissionCommands
from relier_celery.store.connection import connect, list_lengths, parse_sentinel_url, script_text
from relier_celery.store.dlq import DlqCommands
from relier_celery.store.idempotency import IdempotencyCommands
from relier_celery.store.leases import LeaseCommands
from relier_celery.store.progress import ProgressCommands
from relier_celery.store.registry import Receipt, ReceiptCall, RegistryCommands
from relier_celery.store.visibility import VisibilityCommands

__all__ = [
    "Receipt",
    "ReceiptCall",
    "Store",
    "connect",
    "list_lengths",
    "parse_sentinel_url",
    "script_text",
]


class Store(
    LeaseCommands,
    RegistryCommands,
    IdempotencyCommands,
    AdmissionCommands,
    ProgressCommands,
    VisibilityCommands,
    DlqCommands,
):
    """Relier's state in Redis, under one key prefix."""
