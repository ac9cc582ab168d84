"""Duplicate side effects of an idempotent task under duplicate dispatch and SIGKILLs: every
order is dispatched twice, workers that are charging are SIGKILLed mid-run and replaced, and
the side effects are counted from outside. Relier runs each order's effect once per key
(docs/idempotency.md: a repeat only when a worker dies between the effect and the stored
result); vanilla Celery runs every delivery it does not lose."""

from __future__ import annotations

import random
import signal
import time
from typing import Any

from celery import Celery

from relier_celery.bench.delivery import alive, settle
from relier_celery.bench.harness import Harness, kill_all

__all__ = ["duplicates"]

# Seconds the chaos part of the phase may take before the kills stop.
KILL_WINDOW = 30.0


def duplicates(
    h: Harness, relier: bool, orders: int, kills: int, still: float, seed: int = 6
) -> dict[str, Any]:
    """Dispatch each of ``orders`` charges (0.2-0.8 s) twice on two workers of two processes,
    SIGKILL ``kills`` workers that are charging; once nothing is left to run
    (:func:`~.delivery.settle`): the effects per order."""
    r = h.reset()
    app = Celery("pub", broker=h.url, set_as_current=False)
    rng = random.Random(seed)
    fleet = [h.worker(relier, "idem", concurrency=2) for _ in range(2)]
    killed = 0
    try:
        with app.producer_or_acquire() as producer:
            for order in range(orders):
                seconds = round(rng.uniform(0.2, 0.8), 2)
                for _ in range(2):
                    app.send_task("bench.charge", args=(order, seconds), producer=producer)
        h.wait_reported(fleet)
        end = time.monotonic() + KILL_WINDOW
        while killed < kills and time.monotonic() < end:
            time.sleep(rng.uniform(0.5, 1.0))
            charging = {int(ppid) for ppid in r.hvals("bench:charging")}
            victims = [w for w in alive(fleet) if w.pid in charging]
            if victims:
                rng.choice(victims).kill(signal.SIGKILL)
                killed += 1
                fleet.append(h.worker(relier, "idem", concurrency=2))

        def effects() -> list[int]:
            return [int(v or 0) for v in r.mget([f"bench:charged:{o}" for o in range(orders)])]

        # Every dispatch charged (vanilla without a loss), or nothing left to run.
        settle(r, lambda: sum(effects()), 2 * orders, still, time.monotonic() + 300)
        counts = effects()
    finally:
        kill_all(fleet)
        app.close()
    if not relier:
        h.check_vanilla("idempotent duplicates", fleet)
    return {
        "kills": killed,
        "duplicate_effects": sum(max(0, c - 1) for c in counts),
        "orders_charged_twice": sum(1 for c in counts if c > 1),
        "orders_never_charged": sum(1 for c in counts if c == 0),
    }
