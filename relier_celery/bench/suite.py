"""``bench all``: every measurement, relier against vanilla Celery in the same run, as one
document (the JSON of ``rl bench all --json``; :mod:`relier_celery.bench.report` draws the
table from it).

A run is a list of steps, each one side of one measurement, bounded in tasks and seconds by
its :class:`Profile`; ``QUICK`` fits in under 3 minutes on 2 cores. Each step starts from an
empty Redis database; each vanilla step ends with its proof (:mod:`.harness`).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from importlib.metadata import version
from typing import Any

from relier_celery.bench.admission_cost import admission_cost
from relier_celery.bench.delivery import chaos_loss, recovery
from relier_celery.bench.harness import Harness
from relier_celery.bench.idempotent import duplicates
from relier_celery.bench.overhead import overhead
from relier_celery.bench.sigterm import drain

__all__ = ["FULL", "QUICK", "Profile", "Step", "run_all", "steps"]


@dataclass(frozen=True)
class Profile:
    """How big each measurement is."""

    throughput_tasks: int
    """No-op tasks per throughput round and side."""
    throughput_rounds: int
    """Throughput rounds per side (the median is reported)."""
    latency_samples: int
    """One-at-a-time tasks per side for the latency."""
    admission_calls: int
    """Admission decisions (and as many PINGs)."""
    chaos_tasks: int
    """Tasks of 0-5 ms per side under SIGKILL chaos."""
    chaos_kills: int
    """Whole-worker SIGKILLs per side, one a second."""
    still: float
    """Seconds without progress after which what has not run counts as lost, even if relier
    still holds it (above its lease + scan interval, 5 s at defaults). With nothing left to
    run, a phase ends sooner (delivery.settle)."""
    recovery_kills: int
    """Workers SIGKILLed per side for the recovery time."""
    recovery_tasks: int
    """Tasks each of them is running when killed."""
    recovery_wait: float
    """Seconds a killed worker's task has to run again before it counts as not recovered."""
    idempotency_orders: int
    """Idempotent charges, each dispatched twice, per side."""
    idempotency_kills: int
    """Workers SIGKILLed while charging, per side."""
    drain_tasks: int
    """Jobs of 2-4 s in the backlog of the worker sent SIGTERM."""
    drain_timeout: float
    """relier_drain_timeout of relier's side (s)."""

    def scaled(self, factor: float) -> Profile:
        """Every count times ``factor`` (at least 1, and 2 kills where kills are counted);
        durations unchanged. For tests that need every figure faster, not better ones."""

        def n(v: int, low: int = 1) -> int:
            return max(low, round(v * factor))

        return replace(
            self,
            throughput_tasks=n(self.throughput_tasks, 100),
            throughput_rounds=n(self.throughput_rounds),
            latency_samples=n(self.latency_samples, 20),
            admission_calls=n(self.admission_calls, 100),
            chaos_tasks=n(self.chaos_tasks, 100),
            chaos_kills=n(self.chaos_kills, 2),
            recovery_kills=n(self.recovery_kills),
            recovery_tasks=n(self.recovery_tasks),
            idempotency_orders=n(self.idempotency_orders, 4),
            idempotency_kills=n(self.idempotency_kills),
            drain_tasks=n(self.drain_tasks, 4),
        )


QUICK = Profile(
    throughput_tasks=1000,
    throughput_rounds=1,
    latency_samples=100,
    admission_calls=2000,
    chaos_tasks=3000,
    chaos_kills=4,
    still=7.0,
    recovery_kills=2,
    recovery_tasks=3,
    recovery_wait=10.0,
    idempotency_orders=16,
    idempotency_kills=2,
    drain_tasks=6,
    drain_timeout=0.5,
)
FULL = Profile(
    throughput_tasks=3000,
    throughput_rounds=3,
    latency_samples=300,
    admission_calls=10000,
    chaos_tasks=10000,
    chaos_kills=10,
    still=15.0,
    recovery_kills=4,
    recovery_tasks=4,
    recovery_wait=30.0,
    idempotency_orders=40,
    idempotency_kills=4,
    drain_tasks=12,
    drain_timeout=1.0,
)


@dataclass(frozen=True)
class Step:
    """One side of one measurement: where its figures go in the document, what the progress
    bar says, roughly how long it takes (the bar's weight), and what runs it."""

    path: str
    label: str
    seconds: float
    run: Callable[[], Any]


def steps(h: Harness, p: Profile) -> list[Step]:
    sides = (("vanilla", False), ("relier", True))
    tp = p.throughput_tasks * p.throughput_rounds * 2 / 800
    out = [
        Step(
            "overhead",
            "throughput and latency per task",
            tp + p.throughput_rounds * 8 + p.latency_samples * 0.01 + 8,
            lambda: overhead(h, p.throughput_tasks, p.throughput_rounds, p.latency_samples),
        ),
        Step(
            "admission",
            "admission decision vs PING",
            p.admission_calls / 5000 + 1,
            lambda: admission_cost(h.url, p.admission_calls),
        ),
    ]
    # Each measurement with both sides: (path, label, seconds, run), given relier's side or not.
    paired: list[tuple[str, str, Callable[[bool], float], Callable[[bool], Any]]] = [
        (
            "delivery",
            "delivery under SIGKILL chaos",
            lambda rel: p.chaos_kills + p.chaos_tasks / 600 + 8,
            lambda rel: chaos_loss(h, rel, p.chaos_tasks, p.chaos_kills, p.still),
        ),
        (
            "recovery",
            "recovery after SIGKILL",
            lambda rel: (p.recovery_kills * 8 if rel else 3 + p.recovery_wait) + 4,
            # One kill is enough to see whether vanilla Celery recovers at all.
            lambda rel: recovery(
                h, rel, p.recovery_kills if rel else 1, p.recovery_tasks, p.recovery_wait
            ),
        ),
        (
            "idempotency",
            "idempotent task under duplicates and kills",
            lambda rel: p.idempotency_orders * 0.25 + p.idempotency_kills + 8,
            lambda rel: duplicates(h, rel, p.idempotency_orders, p.idempotency_kills, p.still),
        ),
        (
            "drain",
            "drain on SIGTERM",
            lambda rel: p.drain_tasks * 1.5 + 4,
            lambda rel: drain(h, rel, p.drain_tasks, p.still, p.drain_timeout),
        ),
    ]
    for path, label, seconds, run in paired:
        for side, rel in sides:
            out.append(Step(f"{path}.{side}", f"{label}, {side}", seconds(rel), partial(run, rel)))
    return out


def _put(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        doc = doc.setdefault(key, {})
    doc[last] = value


def run_all(
    h: Harness,
    p: Profile,
    *,
    quick: bool,
    redis_info: dict[str, Any],
    on_step: Callable[[list[Step], int], None] | None = None,
) -> dict[str, Any]:
    """Run every step in order (``on_step(steps, index)`` before each) and return the
    document, with the vanilla side's proof."""
    from kombu.transport.redis import Channel

    started = time.monotonic()
    todo = steps(h, p)
    doc: dict[str, Any] = {
        "quick": quick,
        "profile": asdict(p),
        "redis": redis_info,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "celery": version("celery"),
            "kombu": version("kombu"),
            "relier_celery": version("relier-celery"),
        },
    }
    took: dict[str, float] = {}
    for i, step in enumerate(todo):
        if on_step is not None:
            on_step(todo, i)
        at = time.monotonic()
        _put(doc, step.path, step.run())
        took[step.path] = round(time.monotonic() - at, 1)
    doc["delivery"]["tasks"] = p.chaos_tasks
    doc["recovery"]["vanilla"]["visibility_timeout_s"] = Channel.visibility_timeout
    doc["idempotency"]["orders"] = p.idempotency_orders
    doc["idempotency"]["dispatches"] = 2 * p.idempotency_orders
    doc["drain"]["tasks"] = p.drain_tasks
    doc["drain"]["drain_timeout_s"] = p.drain_timeout
    doc["vanilla_proof"] = h.proof()
    doc["step_seconds"] = took
    doc["elapsed_s"] = round(time.monotonic() - started, 1)
    return doc
