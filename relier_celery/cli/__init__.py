"""``celery -A app relier ...`` and its short alias ``rl -A app ...``.

The ``relier`` click group (group.py) is registered through the ``celery.commands`` entry
point, so Celery's own CLI loads the app (``ctx.obj.app``). ``rl`` rewrites its arguments into
that form and runs Celery's CLI, so both spellings are the same code. Importing this package
registers every subcommand on the group.
"""

from __future__ import annotations

from relier_celery.cli import bench as _bench  # noqa: F401  (registers `relier bench`)
from relier_celery.cli import chaos as _chaos  # noqa: F401  (registers `relier chaos`)
from relier_celery.cli import cluster as _cluster  # noqa: F401  (registers `relier cluster up`)
from relier_celery.cli import dlq as _dlq  # noqa: F401  (registers `relier dlq`)
from relier_celery.cli import drain as _drain  # noqa: F401  (registers `relier drain`, `worker drain`)
from relier_celery.cli import inspect as _inspect  # noqa: F401  (inspect / tasks / workers)
from relier_celery.cli.group import main, relier

__all__ = ["main", "relier"]
