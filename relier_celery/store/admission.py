"""Redis command of admission control (features/admission.py): one GCRA decision over every
bucket a dispatch counts against.
"""

from __future__ import annotations

from typing import Any

from relier_celery.store.connection import Connection

__all__ = ["AdmissionCommands"]


class AdmissionCommands(Connection):
    """Admit a dispatch, or say how long to wait."""

    def admit(self, buckets: list[tuple[str, int, int]], cost: int = 1) -> tuple[int, ...]:
        """One GCRA decision over ``(key, interval_us, burst)`` buckets, all or nothing; return
        (allowed 0/1, retry_after_ms, remaining, reset_ms, index of the refusing bucket)."""
        keys = [key for key, _, _ in buckets]
        args: list[Any] = [cost]
        for _, interval_us, burst in buckets:
            args += [interval_us, burst]
        return tuple(int(x) for x in self._run("admit", keys, args))
