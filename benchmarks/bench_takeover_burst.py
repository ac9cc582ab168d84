"""The receipt side of a takeover alone: how long a survivor's consumer spends taking over a
dead worker's burst of redeliveries, and how many Redis round trips that costs.

    python benchmarks/bench_takeover_burst.py [--bursts 300] [--per-burst 4]

Each burst: ``--per-burst`` deliveries recorded under a worker id that has no presence
connection (it died), then their broker redeliveries received by the worker's receipt,
against a throwaway redis-server: one after another (``Inflight.receive``, as the consumer
called it before 2026-12-06) and together (``Inflight.receive_many``, as the consumer calls
it now for messages that arrive together: wiring/burst.py), alternating burst by burst.
bench_rabbitmq.py measures the whole recovery, with real workers and RabbitMQ; this isolates
the part relier adds on the consumer, which a SIGKILL's noise hides there. Run it with another
checkout first on ``PYTHONPATH`` to compare two versions.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import uuid
from types import SimpleNamespace
from typing import Any

import redis
from stats import pct

from relier_celery.core.config import RelierConfig
from relier_celery.core.headers import PUBLICATION_HEADER
from relier_celery.core.keys import Keys
from relier_celery.core.record import TaskRecord
from relier_celery.recovery.inflight import Inflight
from relier_celery.store.client import Store
from relier_celery.testing import RedisServer, task_headers

BODY = b'[[], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'


class Redelivery:
    """What the consumer hands relier: a kombu message the broker redelivered."""

    def __init__(self, headers: dict[str, Any]) -> None:
        self.headers = headers
        self.body = BODY
        self.content_type = "application/json"
        self.content_encoding = "utf-8"
        self.properties: dict[str, Any] = {}
        self.delivery_tag = "1"
        self.delivery_info = {"exchange": "", "routing_key": "celery", "redelivered": True}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bursts", type=int, default=300)
    parser.add_argument("--per-burst", type=int, default=4)
    args = parser.parse_args()
    logging.getLogger("relier_celery").setLevel(logging.ERROR)  # a takeover logs a line
    with RedisServer() as url:
        store = Store(url, Keys("rl"))
        config = RelierConfig.from_mapping({"relier_reliable_fetch": False}, broker_url=url)
        app = SimpleNamespace(conf=SimpleNamespace(accept_content=["json"]), tasks={"t": None})
        resurrector = SimpleNamespace(app=app, max_resurrections=lambda _name: 3)
        sent = [0]
        real = redis.connection.AbstractConnection.send_packed_command

        def counted(self: Any, *a: Any, **kw: Any) -> Any:
            sent[0] += 1  # one write to Redis: one round trip
            return real(self, *a, **kw)

        redis.connection.AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]
        took: dict[str, list[float]] = {"one by one": [], "together": []}
        trips: dict[str, list[int]] = {"one by one": [], "together": []}
        for n in range(2 * args.bursts):
            way = "together" if n % 2 else "one by one"
            dead = f"dead@host/1/{uuid.uuid4().hex[:8]}"
            burst = []
            for _ in range(args.per_burst):
                headers = task_headers(uuid.uuid4().hex, task="t", **{PUBLICATION_HEADER: "p"})
                message = Redelivery(headers)
                record = TaskRecord.from_message(message, dead)  # what the dead worker held
                store.record(record.delivery_id, dead, record.generation, record.dumps())
                burst.append(message)
            inflight = Inflight(config, store, "survivor", resurrector)  # type: ignore[arg-type]
            sent[0] = 0
            started = time.perf_counter()
            if way == "together":
                verdicts: list[Any] = inflight.receive_many(burst, {"t"})
            else:
                verdicts = [inflight.receive(m, {"t"}) for m in burst]
            took[way].append((time.perf_counter() - started) * 1000)
            trips[way].append(sent[0])
            assert verdicts == ["run"] * args.per_burst, verdicts
    for way in took:
        print(
            f"a burst of {args.per_burst} redeliveries taken over {way:>10}: p50 "
            f"{statistics.median(took[way]):.2f} ms, p99 {pct(took[way], 99):.2f} ms, "
            f"{statistics.median(trips[way]):.0f} Redis round trips ({args.bursts} bursts)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
