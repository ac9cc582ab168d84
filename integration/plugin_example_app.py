"""The app of docs/pytest-plugin.md's example, as a user writes it: relier enabled by
``imports``, a broker URL for production. The pytest plugin points it at a throwaway Redis."""

from __future__ import annotations

import time

from celery import Celery

app = Celery("plugin_example_app", broker="redis://localhost:6379/0")
app.conf.imports = ("relier_celery",)


@app.task(name="example.slow_add")
def slow_add(x: int, y: int, seconds: float) -> int:
    time.sleep(seconds)
    return x + y
