"""Schema versions: old and new workers share one queue.

A task's ``schema_version`` option (default 1) travels in the ``relier_schema`` header of every
message published for it (no header means 1). A worker that receives an older version first
runs the registered :func:`migration` functions on the arguments, one version at a time; a
newer version than it knows is not run: it is requeued after ``relier_schema_requeue_delay``
for a newer worker, and quarantined (``schema_too_new``) after ``relier_schema_max_requeues``
tries. A missing link in a task's migration chain stops the worker at start.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kombu import serialization

from relier_celery.core import events
from relier_celery.core.errors import ConfigError
from relier_celery.core.headers import SCHEMA_HEADER
from relier_celery.core.record import TaskRecord
from relier_celery.recovery.envelope import BadMessage

__all__ = [
    "check_migrations",
    "emit_migrated",
    "migrate",
    "migration",
    "rewrite_body",
    "schema_version",
    "validate_task",
]

# The task options this module reads (wiring/task_options.py checks every task's against all).
TASK_OPTIONS = ("schema_version",)


def validate_task(name: str, task: Any) -> None:
    """Raise :class:`ConfigError` for a bad ``schema_version`` of a task."""
    version = getattr(task, "schema_version", None)
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or version < 1
    ):
        raise ConfigError(f"task {name!r}: schema_version must be an integer >= 1, got {version!r}")


Migration = Callable[[list[Any], dict[str, Any]], tuple[Sequence[Any], Mapping[str, Any]]]
_migrations: dict[str, dict[int, Migration]] = {}


# -- schema versions --------------------------------------------------------------------
def migration(task_name: str, from_version: int) -> Callable[[Migration], Migration]:
    """Register ``fn(args, kwargs) -> (args, kwargs)`` turning ``from_version`` arguments of
    ``task_name`` into ``from_version + 1`` arguments::

        @relier_celery.migration("shop.process_order", from_version=1)
        def add_currency(args, kwargs):
            return args, {**kwargs, "currency": "EUR"}
    """
    if isinstance(from_version, bool) or not isinstance(from_version, int) or from_version < 1:
        raise ConfigError(
            f"migration of {task_name!r}: from_version must be an integer >= 1, "
            f"got {from_version!r}"
        )

    def register(fn: Migration) -> Migration:
        chain = _migrations.setdefault(task_name, {})
        if chain.get(from_version) not in (None, fn):
            raise ConfigError(
                f"two migrations of {task_name!r} from version {from_version}: keep one"
            )
        chain[from_version] = fn
        return fn

    return register


def schema_version(task: Any) -> int:
    return int(getattr(task, "schema_version", None) or 1)


def check_migrations(app: Any) -> None:
    """Raise :class:`ConfigError` for a task whose migration chain has a gap, or a migration
    past its task's version (checked at worker start)."""
    for name, task in sorted(app.tasks.items()):
        version = schema_version(task)
        chain = _migrations.get(name, {})
        missing = [v for v in range(1, version) if v not in chain]
        if missing:
            raise ConfigError(
                f"task {name!r} is at schema_version {version} but has no migration from "
                f"version(s) {missing}: register @relier_celery.migration({name!r}, "
                f"from_version={missing[0]}), or a message of that version could not run"
            )
        beyond = [v for v in chain if v >= version]
        if beyond:
            raise ConfigError(
                f"task {name!r} is at schema_version {version} but has a migration from "
                f"version {beyond[0]}: raise its schema_version or remove the migration"
            )


def migrate(
    task_name: str, from_version: int, to_version: int, args: list[Any], kwargs: dict[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    """Run the migrations of ``task_name`` from ``from_version`` up to ``to_version``."""
    chain = _migrations.get(task_name, {})
    for version in range(from_version, to_version):
        new_args, new_kwargs = chain[version](list(args), dict(kwargs))
        args, kwargs = list(new_args), dict(new_kwargs)
    return args, kwargs


def rewrite_body(
    message: Any, args: list[Any], kwargs: dict[str, Any], embed: dict[str, Any], version: int
) -> None:
    """Replace a received message's body with migrated arguments, in its own serializer."""
    name = serialization.registry.type_to_name.get(message.content_type)
    if name is None:
        raise BadMessage("undecodable", f"no serializer for {message.content_type!r}")
    content_type, encoding, payload = serialization.dumps(  # type: ignore[no-untyped-call]
        [args, kwargs, embed], serializer=name
    )
    if isinstance(payload, str):
        payload = payload.encode(encoding or "utf-8")
    message.body = payload
    message.content_type = content_type
    message.content_encoding = encoding
    if hasattr(message, "_decoded_cache"):
        message._decoded_cache = None
    message.headers[SCHEMA_HEADER] = version


def emit_migrated(record: TaskRecord, from_version: int, to_version: int) -> None:
    events.emit(
        events.TASK_MIGRATED,
        f"{record.task_name}[{record.task_id}] migrated from schema {from_version} to {to_version}",
        task_id=record.task_id,
        task_name=record.task_name,
        from_version=from_version,
        to_version=to_version,
    )
