"""Relier's own Celery task: ``relier.resurrect``, an optional scan to put in the beat schedule.

Every worker already scans (``relier_scanner_enabled``); the beat task is for fleets that turn
the per-worker scanner off, or want one more scanner that does not depend on worker uptime.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RESURRECT_TASK", "register_tasks"]

RESURRECT_TASK = "relier.resurrect"


def register_tasks(app: Any) -> None:
    """Register relier's tasks on ``app`` (called once per app, by ``install``)."""

    @app.task(name=RESURRECT_TASK, ignore_result=True, shared=False)  # type: ignore[untyped-decorator]
    def resurrect() -> int:
        """Resurrect the tasks of every worker whose lease ran out; return how many."""
        from relier_celery.recovery.resurrect import Resurrector
        from relier_celery.runtime import install

        relier = install(app)
        return Resurrector(app, relier.config, relier.store, name="beat").scan_once()
