"""The runtime of one Celery app: its relier settings, its store and, in a worker, its worker
id, made once by :func:`install` and hung on the app (``app.relier``), as celery-redbeat hangs
its configuration on the app. Everything below the Celery wiring is handed this object, or
reads it from the app it already has; nothing looks it up in a module global.

:func:`install` is idempotent and safe from any thread. The Celery wiring adds relier's tasks
and task methods to an app when its runtime is made: it registers that step with
:func:`on_install` when it is imported, which importing ``relier_celery`` always does, so a
feature that makes the runtime lazily (a publisher's first admitted dispatch, an
``idempotency_lock`` outside a worker) wires the app exactly as ``relier_celery.install`` does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from relier_celery.core.config import RelierConfig
from relier_celery.core.keys import Keys
from relier_celery.store.client import Store

__all__ = ["ATTR", "Relier", "attach", "install", "of", "on_install"]

# The attribute of a Celery app that holds its runtime.
ATTR = "relier"

_lock = threading.RLock()
# Set once, when the wiring is imported (see the module docstring); never changed after.
_installers: list[Callable[[Any], None]] = []


@dataclass
class Relier:
    """What relier knows about one Celery app."""

    app: Any
    config: RelierConfig
    store: Store
    worker_id: str = ""
    """This process's worker lease id, set by the worker at start before its pool forks
    (idempotency claims name it); "" outside a worker."""
    hard_limit_enforced: bool = True
    """Whether Celery's own time limit stops a sync task at its hard timeout (only the prefork
    pool can); where not, the task's watchdog reports the hard timeout instead."""
    worker: Any = None
    """The worker's own state (``wiring.bootsteps.WorkerRuntime``) once it started, in its main
    process: the signal handlers reach the drain and the registry through it."""


def of(app: Any) -> Relier | None:
    """The runtime of ``app`` if :func:`install` made one, else None."""
    runtime = getattr(app, ATTR, None)
    return runtime if isinstance(runtime, Relier) else None


def install(app: Any) -> Relier:
    """Read and validate ``app``'s relier settings once and hang the runtime on the app; later
    calls return the same object. Raises :class:`~relier_celery.errors.ConfigError` on a bad
    setting."""
    with _lock:
        runtime = of(app)
        if runtime is None:
            config = RelierConfig.from_app(app)
            store = Store(
                config.redis_url,
                Keys(config.prefix),
                config.redis_options,
                cluster=config.redis_cluster,
                broker_url=app.conf.broker_url or "",
            )
            runtime = Relier(app, config, store)
            attach(app, runtime)
            for installer in _installers:
                installer(app)
        return runtime


def attach(app: Any, runtime: Relier) -> None:
    """Hang ``runtime`` on ``app`` as is (tests build one by hand)."""
    setattr(app, ATTR, runtime)


def on_install(installer: Callable[[Any], None]) -> None:
    """Run ``installer(app)`` whenever :func:`install` makes an app's runtime (the Celery
    wiring registers itself here once, at import)."""
    if installer not in _installers:
        _installers.append(installer)
