"""Timing helpers shared by the benchmarks (run as scripts: ``python benchmarks/bench_x.py``)."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence


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


def ratio_interval(
    num: Sequence[Sequence[float]], den: Sequence[Sequence[float]], resamples: int = 2000
) -> tuple[float, float]:
    """A 95% interval of median(num) / median(den), by resampling whole rounds (the values of
    one round, e.g. the tasks of one kill, are not independent of each other): whether a
    ratio above or below 1 is more than the run's noise."""
    rng = random.Random(0)
    out = []
    for _ in range(resamples):
        a = [v for r in rng.choices(num, k=len(num)) for v in r]
        b = [v for r in rng.choices(den, k=len(den)) for v in r]
        out.append(statistics.median(a) / statistics.median(b))
    return pct(out, 2.5), pct(out, 97.5)
