"""What every benchmark phase shares: the Redis it runs on, its real ``celery worker``
processes of ``worker_app/bench_app.py`` (with or without relier), and the proof that
the vanilla side ran without relier.

The proof, checked after each vanilla phase while that phase's keys are still in Redis: no
line of any vanilla worker's log mentions relier (even a WARNING-level log would show relier's
start-up warning about a Redis without AOF), no bootstep of either blueprint is relier's, and
no key under relier's prefix exists. A failed proof raises :class:`BenchError`: the figures
would compare relier with relier.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from relier_celery.core.errors import BenchError
from relier_celery.observe.summary import percentile
from relier_celery.testing import WorkerProcess, wait_for

__all__ = ["APP_DIR", "Harness", "kill_all", "ms", "pcts", "running", "terminate"]

# The folder of bench_app.py, first on every benchmark worker's path (worker_app/__init__.py
# says why not relier_celery.bench.worker_app.bench_app).
APP_DIR = Path(__file__).resolve().parent / "worker_app"
APP_MODULE = "bench_app"
# relier's key prefix at default settings (bench_app sets no relier_prefix).
PREFIX = "rl"


def running(w: WorkerProcess) -> bool:
    """True while the worker runs; raises with its log's tail if it exited (a worker that fails
    to start must not leave the benchmark waiting for tasks that never run)."""
    if w.proc is not None and w.proc.poll() is not None:
        raise BenchError(f"worker {w.hostname} exited with {w.proc.returncode}: {_tail(w)}")
    return True


def _tail(w: WorkerProcess) -> str:
    lines = [line for line in w.log().splitlines() if line.strip()]
    return lines[-1] if lines else "(empty log)"


def terminate(w: WorkerProcess) -> None:
    """SIGTERM without waiting: the worker stops taking work at once and exits on its own."""
    if w.proc is not None and w.proc.poll() is None:
        os.kill(w.pid, signal.SIGTERM)


def kill_all(workers: Iterable[WorkerProcess]) -> None:
    """End a phase: SIGKILL every worker's process group. Its figures are taken by then, and
    a warm shutdown would cost seconds a worker and measure nothing (the drain phase measures
    SIGTERM on its own)."""
    for w in workers:
        w.kill(signal.SIGKILL)
        w.stop(timeout=0)  # reaps it, and SIGKILLs what is left of its group


def pcts(values: Sequence[float], digits: int = 3) -> dict[str, float | None]:
    """p50, p99 and max of ``values``, rounded; None for no values."""

    def rnd(v: float | None) -> float | None:
        return None if v is None else round(v, digits)

    return {
        "p50": rnd(percentile(list(values), 0.5)),
        "p99": rnd(percentile(list(values), 0.99)),
        "max": rnd(max(values, default=None)),
    }


def ms(seconds: Iterable[float]) -> list[float]:
    return [s * 1000 for s in seconds]


@dataclass
class Harness:
    """One benchmark run's Redis, the folder of its worker logs, and its vanilla proofs.

    ``vanilla_python``: the interpreter of the vanilla workers (a virtualenv without relier);
    None runs them with this one, relier installed but not in the app's imports."""

    url: str
    log_dir: Path
    vanilla_python: str | None = None
    proofs: list[dict[str, Any]] = field(default_factory=list)
    _n: int = 0

    def client(self) -> redis.Redis:
        """A client of the benchmark's Redis that decodes replies."""
        return redis.Redis.from_url(self.url, decode_responses=True)

    def reset(self) -> redis.Redis:
        """Empty the benchmark's database (every phase starts from nothing) and return it."""
        r = self.client()
        r.flushdb()
        return r

    def worker(
        self,
        relier: bool,
        name: str,
        *,
        pool: str = "prefork",
        concurrency: int = 2,
        quiet: bool = True,
        conf: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
    ) -> WorkerProcess:
        """A started worker; ``quiet`` logs warnings only, so per-task log lines do not dilute
        overhead. Its hostname is ``name`` plus a sequence number, unique in the run."""
        self._n += 1
        vanilla_apart = not relier and self.vanilla_python is not None
        env = {
            "BENCH_REDIS": self.url,
            "BENCH_RELIER": "1" if relier else "0",
            "BENCH_CONF": json.dumps(conf or {}),
            **(env or {}),  # BENCH_BROKER, BENCH_QUEUE: another broker (bench_rabbitmq.py)
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(APP_DIR), os.environ.get("PYTHONPATH", "")) if p
            ),
        }
        w = WorkerProcess(
            APP_MODULE,
            pool=pool,
            concurrency=concurrency,
            hostname=f"{name}{self._n}@{socket.gethostname()}",
            env=env,
            log_path=str(self.log_dir / f"{name}{self._n}.log"),
            extra=["--loglevel", "WARNING"] if quiet else [],
            python=self.vanilla_python if vanilla_apart else None,
        )
        return w.start()

    def check_vanilla(self, phase: str, workers: Sequence[WorkerProcess]) -> dict[str, Any]:
        """After a vanilla phase (its workers stopped, Redis not yet emptied): what shows that
        relier did not act. Raises :class:`BenchError` if it did."""
        r = self.client()
        lines = [
            f"{w.hostname}: {line.strip()}"
            for w in workers
            for line in w.log().splitlines()
            if "relier" in line.lower()
        ]
        keys = [k for k in r.scan_iter(f"{PREFIX}:*", count=1000)]
        reports = [json.loads(v) for v in r.mget(self._report_keys(r)) if v]
        if not reports:
            raise BenchError(f"{phase}: no vanilla worker reported its bootsteps")
        steps = sorted({s for rep in reports for s in rep["steps"] if "relier" in s.lower()})
        if lines or keys or steps:
            first = lines[0] if lines else keys[0] if keys else steps[0]
            raise BenchError(
                f"the vanilla side of {phase} ran relier ({len(lines)} relier log line(s), "
                f"bootsteps {steps}, {len(keys)} relier key(s); first: {first}): its figures "
                "would compare relier with relier"
            )
        proof = {
            "phase": phase,
            "workers": len(workers),
            "workers_reported": len(reports),
            "relier_log_lines": 0,
            "relier_bootsteps": 0,
            "relier_keys": 0,
            "relier_imported": any(rep["imported"] for rep in reports),
        }
        self.proofs.append(proof)
        return proof

    def proof(self) -> dict[str, Any]:
        """The vanilla side's proof over the run so far: ``ok`` once at least one phase was
        checked (a failed check raised already), each phase's check, and one line."""
        imported = sorted({"yes" if c["relier_imported"] else "no" for c in self.proofs})
        where = (
            f"vanilla workers run by {self.vanilla_python}, where relier is not installed"
            if self.vanilla_python
            else "vanilla workers run by this interpreter: relier installed (Celery's CLI "
            "imports its entry point) but not in the app's imports, so inactive"
        )
        workers = sum(int(c["workers"]) for c in self.proofs)
        return {
            "ok": bool(self.proofs),
            "phases_checked": len(self.proofs),
            "workers_checked": workers,
            "relier_log_lines": 0,
            "relier_bootsteps": 0,
            "relier_keys": 0,
            "vanilla_python": self.vanilla_python,
            "checks": self.proofs,
            "summary": (
                f"vanilla side checked after each of its {len(self.proofs)} phases "
                f"({workers} workers): no relier log line, no relier bootstep, no {PREFIX}: "
                f"key; relier_celery imported by the vanilla workers: {'/'.join(imported)}; "
                f"{where}"
            ),
        }

    @staticmethod
    def _report_keys(r: redis.Redis) -> list[str]:
        return sorted(r.scan_iter("bench:bootsteps:*", count=1000))

    def wait_reported(self, workers: Sequence[WorkerProcess], timeout: float = 30) -> None:
        """Wait until every worker is ready (it reported its bootsteps)."""
        r = self.client()
        for w in workers:
            wait_for(
                lambda w=w: running(w) and r.exists(f"bench:bootsteps:{w.hostname}"),
                timeout,
                what=f"worker {w.hostname} to be ready",
            )
