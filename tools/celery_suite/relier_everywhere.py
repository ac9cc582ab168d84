"""pytest plugin: relier in every Celery app that Celery's integration suite builds.

Loaded with ``-p relier_everywhere`` by ``python3 dev.py celery-suite --relier``; the suite is
not edited. Every ``Celery`` app made in the process (the suite's session and function apps,
and the apps its tests build themselves) gets, once its configuration is loaded,
``relier_celery`` appended to ``imports`` and ``relier_redis_url`` pointed at the throwaway
Redis (``RELIER_SUITE_REDIS_URL``) unless the app sets it. That is what a user does to enable
relier: configuration only. The worker then adds relier's bootsteps at ``worker_init``, which
``celery.contrib.testing`` sends as the ``celery worker`` command does.

The plugin also records whether each embedded worker really ran relier (``worker.relier``, set
by relier's worker bootstep), so a run that silently stayed vanilla is caught by the driver.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import test_worker_started

PACKAGE = "relier_celery"
REDIS_URL_ENV = "RELIER_SUITE_REDIS_URL"
# Where the driver reads the workers seen: one JSON line per embedded worker started.
WORKERS_LOG_ENV = "RELIER_SUITE_WORKERS_LOG"

_original_init = Celery.__init__


def _with_relier(imports: Any) -> tuple[Any, ...]:
    if not imports:
        return (PACKAGE,)
    names = (imports,) if isinstance(imports, str) else tuple(imports)
    return names if PACKAGE in names else (*names, PACKAGE)


def add_relier(sender: Any = None, source: Any = None, **_: Any) -> None:
    """``app.on_after_configure`` handler: the app's settings are loaded, none is read yet."""
    conf = source if source is not None else sender.conf
    conf.imports = _with_relier(conf.imports)
    url = os.environ.get(REDIS_URL_ENV)
    if url and not conf.get("relier_redis_url"):
        conf.relier_redis_url = url


def _init(self: Any, *args: Any, **kwargs: Any) -> None:
    _original_init(self, *args, **kwargs)
    self.on_after_configure.connect(add_relier, weak=False)


def _on_worker_started(sender: Any = None, worker: Any = None, **_: Any) -> None:
    path = os.environ.get(WORKERS_LOG_ENV)
    if not path:
        return
    line = {
        "app": getattr(sender, "main", None),
        "hostname": getattr(worker, "hostname", None),
        "relier": getattr(worker, "relier", None) is not None,
    }
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def pytest_configure(config: pytest.Config) -> None:
    # Imported here, not by the loader, so relier's signal handlers are connected before the
    # first worker is built whatever the suite imports first.
    import relier_celery  # noqa: F401

    Celery.__init__ = _init
    test_worker_started.connect(_on_worker_started, weak=False)


def pytest_unconfigure(config: pytest.Config) -> None:
    Celery.__init__ = _original_init


def pytest_report_header(config: pytest.Config) -> str:
    url = os.environ.get(REDIS_URL_ENV, "(the broker)")
    return f"relier_everywhere: {PACKAGE} in every app's imports, relier_redis_url={url}"
