"""Cost of the idempotency check per task vs a Redis PING round trip on the same connection.

    python benchmarks/bench_idempotency.py [--calls 5000]

Against a throwaway local redis-server: p50/p99 of a PING, of the claim (one EVALSHA of
idem_claim.lua) and of a whole check (claim + store of the result), and their ratios to PING
(goal: the claim <= 2x PING). A benchmark, not a test: it prints figures and never fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from stats import pct, timed

from relier_celery.core.keys import Keys
from relier_celery.store.client import Store
from relier_celery.testing import RedisServer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=5000)
    args = parser.parse_args()
    with RedisServer() as url:
        store = Store(url, Keys("rl"))
        client = store.client
        store.renew_lease("bench-worker", ttl=600)
        store.idem_claim("warm", "bench-worker", "t", "a", 60)
        ping = timed(lambda i: client.ping(), args.calls)
        claim = timed(lambda i: store.idem_claim(f"c{i}", "bench-worker", "t", "a", 60), args.calls)

        def check(i: int) -> None:
            out = store.idem_claim(f"k{i}", "bench-worker", "t", "a", 60)
            store.idem_store(f"k{i}", str(out[1]), "1", 3600)

        full = timed(check, args.calls)
    for name, values in (("PING", ping), ("claim", claim), ("claim + store", full)):
        print(
            f"{name:>14}: p50 {statistics.median(values):6.1f} us, p99 {pct(values, 99):6.1f} us"
            f" ({statistics.median(values) / statistics.median(ping):.2f}x PING at p50)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
