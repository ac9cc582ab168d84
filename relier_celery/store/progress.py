"""Redis commands of a task's saved progress (``TaskContext.save_progress``)."""

from __future__ import annotations

from typing import cast

from relier_celery.store.connection import Connection, ms

__all__ = ["ProgressCommands"]


class ProgressCommands(Connection):
    """A task's progress, kept after the task for ``relier_completed_ttl``."""

    def save_progress(self, task_id: str, data: str, ttl: float) -> None:
        self.call(lambda c: c.set(self.keys.progress(task_id), data, px=ms(ttl)))

    def load_progress(self, task_id: str) -> str | None:
        return cast(str | None, self.call(lambda c: c.get(self.keys.progress(task_id))))
