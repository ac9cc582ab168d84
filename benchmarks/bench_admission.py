"""Cost of one admission decision vs a Redis PING round trip on the same connection.

    python benchmarks/bench_admission.py [--calls 10000]

Against a throwaway local redis-server: p50/p99 of a PING, of the decision (one EVALSHA of
admit.lua over one limit, then over a task limit and a queue limit together) and of the whole
``admit()`` path a dispatch takes (option lookup, routing, the EVALSHA), with their ratios to
PING (goal: the decision's p99 <= 2x PING's and under 1 ms). The series are interleaved call by
call. A benchmark, not a test: it prints figures and never fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from celery import Celery
from stats import interleaved, pct

from relier_celery.admission import admit, parse_limit
from relier_celery.plugin import install
from relier_celery.testing import RedisServer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=10_000)
    args = parser.parse_args()
    with RedisServer() as url:
        app = Celery("bench", broker=url)
        app.conf.relier_admission = {"bulk": "1000000/s"}

        # Limits far above the benchmark's pace, so every call is a full (admitted) decision.
        @app.task(name="bench.limited", admission="1000000/s", queue="bulk", shared=False)
        def limited() -> None:
            pass

        store = install(app).store
        client = store.client
        limit = parse_limit("1000000/s", None, "bench")
        one = [(store.keys.admission_task("bench.one"), limit.rate.interval_us, limit.burst)]
        two = [*one, (store.keys.admission_queue("bulk"), limit.rate.interval_us, limit.burst)]
        store.admit(one)  # load the script
        for _ in range(1000):  # warm up the connection and the interpreter
            client.ping()
        ping, decide, decide2, full = interleaved(
            [
                client.ping,
                lambda: store.admit(one),
                lambda: store.admit(two),
                lambda: admit(limited, (), {}, {}),
            ],
            args.calls,
        )
    p50_ping, p99_ping = statistics.median(ping), pct(ping, 99)
    for name, values in (
        ("PING", ping),
        ("decision", decide),
        ("decision, 2 limits", decide2),
        ("admit() path", full),
    ):
        p50, p99 = statistics.median(values), pct(values, 99)
        print(
            f"{name:>18}: p50 {p50:6.1f} us, p99 {p99:6.1f} us "
            f"({p50 / p50_ping:.2f}x PING at p50, {p99 / p99_ping:.2f}x at p99)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
