"""Timing helpers shared by the benchmarks (run as scripts: ``python benchmarks/bench_x.py``)."""

from __future__ import annotations

import time
from collections.abc import Callable


def timed(fn: Callable[[int], object], calls: int, scale: float = 1e6) -> list[float]:
    """Call ``fn(i)`` ``calls`` times; return each call's duration (us, or seconds * scale)."""
    out = []
    for i in range(calls):
        start = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - start) * scale)
    return out


def pct(values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank)."""
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]
