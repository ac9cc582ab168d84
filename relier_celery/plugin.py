"""``install(app)``: one idempotent call that gives an app relier's settings and store, and
``enabled(app)``: whether relier acts in an app at all.

Relier acts only in an app that lists ``relier_celery`` (or a submodule) in ``imports`` or
``include``, or that called ``install(app)``. Importing the package enables nothing: Celery's CLI
imports it in every process (the ``celery.commands`` entry point), whatever the app. Workers of
an enabled app call ``install`` through the bootstep that ``worker_init`` adds; publishers that
never load ``imports`` call it themselves.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

from . import events
from .config import RelierConfig
from .keys import Keys
from .store import Store

__all__ = ["Relier", "decide", "enabled", "get", "inactive_reason", "install", "new_worker_id"]

_installed: weakref.WeakKeyDictionary[Any, Relier] = weakref.WeakKeyDictionary()
_lock = threading.Lock()
# App -> whether relier acts in it. Signal handlers ask per task and per publish, and reading
# app.conf costs about 4 us, a dict lookup 0.1 us.
_enabled: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()

PACKAGE = "relier_celery"
# kombu's in-process transport: an app on it with no relier_redis_url runs without relier.
MEMORY_BROKER = "memory://"
# Apps already told that relier is inactive in them (decide() runs more than once per app).
_warned: weakref.WeakSet[Any] = weakref.WeakSet()


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
            store = Store(
                config.redis_url,
                Keys(config.prefix),
                config.redis_options,
                cluster=config.redis_cluster,
                broker_url=app.conf.broker_url or "",
            )
            relier = Relier(app, config, store)
            _installed[app] = relier
            _enabled[app] = True
            from .dispatch import add_dispatch
            from .tasks import register_tasks

            register_tasks(app)
            add_dispatch()
            if app.finalized:
                _make_async_tasks_sync(app)
            else:
                app.on_after_finalize.connect(_make_async_tasks_sync, weak=False)
        return relier


def enabled(app: Any) -> bool:
    """Whether relier acts in ``app``: decided by :func:`decide` the first time it is asked
    (the worker asks at ``worker_init``), then cached; ``install(app)`` enables it at any time."""
    try:
        return _enabled[app]
    except KeyError:
        return decide(app)
    except TypeError:  # not an app (None, a proxy that cannot be weakly referenced)
        return False


def decide(app: Any) -> bool:
    """Decide afresh from ``app``'s configuration whether relier acts in it, and cache that:
    ``relier_celery`` or one of its submodules in ``imports`` or ``include``, or an earlier
    ``install(app)``. An app listing relier on the in-process ``memory://`` broker with no
    ``relier_redis_url`` runs as plain Celery, with one warning (see :func:`inactive_reason`)."""
    decision = app in _installed or (
        any(
            name == PACKAGE or name.startswith(PACKAGE + ".")
            for setting in (app.conf.imports, app.conf.include)
            for name in _module_names(setting)
        )
        and not _inactive(app)
    )
    _enabled[app] = decision
    return decision


def inactive_reason(app: Any) -> str | None:
    """Why relier stays out of an app that lists it, or None: its broker is kombu's in-process
    ``memory://`` transport (Celery's own test setup, ``celery.contrib.testing``) and no
    ``relier_redis_url`` is set. Nothing there outlives the process, so there is nothing to
    protect and no Redis to keep state in; refusing to start would break the in-memory tests
    Celery's docs teach. Any other broker without a Redis for relier stays an error at start
    (``RelierConfig``)."""
    broker = str(app.conf.broker_url or "")
    if not broker.startswith(MEMORY_BROKER) or app.conf.get("relier_redis_url") is not None:
        return None
    return (
        f"relier is inactive in app {app.main!r}: its broker is the in-process {MEMORY_BROKER} "
        "transport and relier_redis_url is not set, so it runs as plain Celery (set "
        "relier_redis_url to protect its tasks)"
    )


def _inactive(app: Any) -> bool:
    reason = inactive_reason(app)
    if reason is None:
        return False
    if app not in _warned:  # one line per app, however often it is decided
        _warned.add(app)
        events.emit("config.warning", reason, app=str(app.main))
    return True


def _module_names(setting: Any) -> list[str]:
    """The module names of an ``imports``/``include`` setting (a name, or a sequence of names
    or modules)."""
    if not setting:
        return []
    if isinstance(setting, str):
        return [setting]
    names = (getattr(m, "__name__", m) for m in setting)
    return [n for n in names if isinstance(n, str)]


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
