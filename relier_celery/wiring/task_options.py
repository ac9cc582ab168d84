"""The relier task options, each declared by the module that reads it, and their check at
worker start: a bad value, or an unknown option that looks like relier's (a typo Celery would
silently keep as a task attribute), stops the worker with one line naming the task, the option
and the fix.

Each feature or primitive declares ``TASK_OPTIONS`` (the names it reads) and
``validate_task(name, task)`` (raises :class:`~relier_celery.errors.ConfigError`); this module
only gathers them, so the settings know no feature.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from relier_celery.core.errors import ConfigError
from relier_celery.features import admission, idempotency, timeouts
from relier_celery.recovery import dlq, resurrect, schema

__all__ = ["TASK_OPTIONS", "validate_task_options"]

# In the order their checks run.
_DECLARERS = (timeouts, dlq, schema, idempotency, resurrect, admission)
TASK_OPTIONS = frozenset(option for module in _DECLARERS for option in module.TASK_OPTIONS)
_RELIER_LOOKING = re.compile(r"^(rl_|relier_)|resurrect|resurect")


def _looks_like_relier(attr: str) -> bool:
    return bool(_RELIER_LOOKING.search(attr)) or bool(
        difflib.get_close_matches(attr, sorted(TASK_OPTIONS), n=1, cutoff=0.85)
    )


def validate_task_options(app: Any) -> None:
    """Raise :class:`ConfigError` for a bad or mistyped relier option on any registered task."""
    from celery.app.task import Task

    celery_attrs = set(dir(Task))
    for name, task in sorted(app.tasks.items()):
        for attr in vars(type(task)):
            if attr in TASK_OPTIONS or attr in celery_attrs or not _looks_like_relier(attr):
                continue
            hint = difflib.get_close_matches(attr, sorted(TASK_OPTIONS), n=1)
            fix = (
                f"did you mean {hint[0]!r}?" if hint else f"relier options: {sorted(TASK_OPTIONS)}"
            )
            raise ConfigError(f"task {name!r} has unknown relier option {attr!r}: {fix}")
        for module in _DECLARERS:
            module.validate_task(name, task)
