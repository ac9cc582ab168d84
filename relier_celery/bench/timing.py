"""Timing helpers of the benchmarks: bounded waits that fail as a :class:`BenchError`, and
series timed call by call in turn."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from relier_celery.core.errors import BenchError
from relier_celery.testing import wait_for

__all__ = ["interleaved", "wait_until"]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, **kw: Any) -> Any:
    """:func:`~relier_celery.testing.wait_for`, failing as a BenchError that names ``what``:
    every wait of a phase is bounded."""
    try:
        return wait_for(predicate, timeout, what=what, **kw)
    except TimeoutError:
        raise BenchError(f"timed out after {timeout:g} s waiting for {what}") from None


def interleaved(fns: list[Callable[[], object]], calls: int) -> list[list[float]]:
    """Time each function once per round, round after round, so that a busy machine (other
    processes, CPU frequency) weighs on every series alike: the ratios stay meaningful (us)."""
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(calls):
        for fn, series in zip(fns, out, strict=True):
            start = time.perf_counter()
            fn()
            series.append((time.perf_counter() - start) * 1e6)
    return out
