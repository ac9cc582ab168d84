"""``install(app)``: one idempotent call that gives an app relier's settings and store.

Workers call it through the ``worker_init`` signal (so adding ``relier_celery`` to
``imports`` is enough); publishers that never load ``imports`` call it themselves.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

from .config import RelierConfig
from .keys import Keys
from .store import Store

__all__ = ["Relier", "get", "install", "new_worker_id"]

_installed: weakref.WeakKeyDictionary[Any, Relier] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


@dataclass(frozen=True)
class Relier:
    """What relier knows about one Celery app."""

    app: Any
    config: RelierConfig
    store: Store


def install(app: Any) -> Relier:
    """Read and validate ``app``'s relier settings once; later calls return the same object.

    Raises :class:`~relier_celery.errors.ConfigError` on a bad setting."""
    with _lock:
        relier = _installed.get(app)
        if relier is None:
            config = RelierConfig.from_app(app)
            relier = Relier(app, config, Store(config.redis_url, Keys(config.prefix)))
            _installed[app] = relier
            from .dispatch import add_dispatch
            from .tasks import register_tasks

            register_tasks(app)
            add_dispatch()
            if app.finalized:
                _make_async_tasks_sync(app)
            else:
                app.on_after_finalize.connect(_make_async_tasks_sync, weak=False)
        return relier


def _make_async_tasks_sync(sender: Any = None, **_: Any) -> None:
    """Let Celery's synchronous tracer run every ``async def`` task (see aio.py)."""
    from .aio import make_sync
    from .idempotency import make_idempotent

    for task in list(sender.tasks.values()):
        make_sync(task)
        make_idempotent(task)


_worker_id = {"value": ""}


def set_worker_id(worker_id: str) -> None:
    """Set by the worker at start, before its pool forks: idempotency claims name it."""
    _worker_id["value"] = worker_id


def current_worker_id() -> str:
    """This process's worker lease id, or "" outside a worker."""
    return _worker_id["value"]


def get(app: Any) -> Relier | None:
    """The installed relier of an app, if any."""
    return _installed.get(app)


def new_worker_id(hostname: str) -> str:
    """A lease id unique to one worker process incarnation: a restarted worker with the same
    hostname must not renew the dead one's lease, or its tasks would never be resurrected."""
    return f"{hostname or socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
