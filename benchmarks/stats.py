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


def pct(values: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank)."""
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]
