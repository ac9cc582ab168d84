"""Cost of one admission decision vs a Redis PING round trip on the same connection.

    python benchmarks/bench_admission.py [--calls 10000]

Against a throwaway local redis-server: p50/p99 of a PING, of the decision (one EVALSHA of
admit.lua over one limit, then over a task limit and a queue limit together) and of the whole
``admit()`` path a dispatch takes (option lookup, routing, the EVALSHA), with their ratios to
PING (goal: the decision's p99 <= 2x PING's and under 1 ms). The series are interleaved call by
call (relier_celery/bench/admission_cost.py, also behind ``rl bench all``). A benchmark, not a
test: it prints figures and never fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from stats import pct

from relier_celery.bench.admission_cost import admission_series
from relier_celery.testing import RedisServer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=10_000)
    args = parser.parse_args()
    with RedisServer() as url:
        series = admission_series(url, args.calls)
    ping = series["ping"]
    p50_ping, p99_ping = statistics.median(ping), pct(ping, 99)
    for name, values in (
        ("PING", ping),
        ("decision", series["decision"]),
        ("decision, 2 limits", series["decision_2_limits"]),
        ("admit() path", series["admit_path"]),
    ):
        p50, p99 = statistics.median(values), pct(values, 99)
        print(
            f"{name:>18}: p50 {p50:6.1f} us, p99 {p99:6.1f} us "
            f"({p50 / p50_ping:.2f}x PING at p50, {p99 / p99_ping:.2f}x at p99)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
