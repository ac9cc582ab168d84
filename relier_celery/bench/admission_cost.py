"""Cost of one admission decision next to a Redis PING round trip on the same connection:
one EVALSHA of admit.lua over one limit, over a task and a queue limit together, and the whole
``admit()`` path a dispatch takes (option lookup, routing, the EVALSHA), interleaved call by
call with the PINGs. In this process, on relier's store for a throwaway app."""

from __future__ import annotations

from typing import Any

from celery import Celery

from relier_celery.bench.timing import interleaved
from relier_celery.features.admission import admit, parse_limit
from relier_celery.observe.summary import percentile
from relier_celery.wiring.install import install

__all__ = ["admission_cost", "admission_series"]

# Warm-up PINGs before the series (the connection, the interpreter).
WARMUP = 1000


def admission_series(url: str, calls: int) -> dict[str, list[float]]:
    """Each call's duration (us): ``ping``, ``decision``, ``decision_2_limits``, ``admit_path``.
    Limits far above the pace, so every call is a full (admitted) decision."""
    app = Celery("bench_admission", broker=url, set_as_current=False)
    app.conf.relier_admission = {"bulk": "1000000/s"}

    @app.task(name="bench.limited", admission="1000000/s", queue="bulk", shared=False)  # type: ignore[untyped-decorator]
    def limited() -> None:
        pass

    try:
        store = install(app).store
        client = store.client
        limit = parse_limit("1000000/s", None, "bench")
        one = [(store.keys.admission_task("bench.one"), limit.rate.interval_us, limit.burst)]
        two = [*one, (store.keys.admission_queue("bulk"), limit.rate.interval_us, limit.burst)]
        store.admit(one)  # load the script
        for _ in range(WARMUP):
            client.ping()
        ping, decide, decide2, full = interleaved(
            [
                client.ping,
                lambda: store.admit(one),
                lambda: store.admit(two),
                lambda: admit(limited, (), {}, {}),
            ],
            calls,
        )
    finally:
        app.close()
    return {"ping": ping, "decision": decide, "decision_2_limits": decide2, "admit_path": full}


def admission_cost(url: str, calls: int) -> dict[str, Any]:
    """The decision's p50/p99 in ms, PING's, and their ratio at p99."""
    series = admission_series(url, calls)
    ping, decide = series["ping"], series["decision"]

    def p(values: list[float], q: float) -> float:
        return (percentile(values, q) or 0.0) / 1000

    return {
        "calls": calls,
        "decision_p50_ms": round(p(decide, 0.5), 4),
        "decision_p99_ms": round(p(decide, 0.99), 4),
        "ping_p50_ms": round(p(ping, 0.5), 4),
        "ping_p99_ms": round(p(ping, 0.99), 4),
        "ratio_to_ping_p99": round(p(decide, 0.99) / p(ping, 0.99), 2),
        "admit_path_p99_ms": round(p(series["admit_path"], 0.99), 4),
    }
