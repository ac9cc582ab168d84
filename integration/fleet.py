"""Helpers of the integration tests: a fleet of real workers, and counters read from Redis."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from relier_celery.keys import Keys
from relier_celery.testing import WorkerProcess, wait_for

HERE = Path(__file__).parent


class Fleet:
    """Starts, kills and replaces real workers of ``chaos_app``."""

    def __init__(self, redis_url: str, tmp_path: Path) -> None:
        self.redis_url = redis_url
        self.tmp_path = tmp_path
        self.workers: list[WorkerProcess] = []
        self.env: dict[str, str] = {}
        self._n = 0

    def start(
        self, pool: str = "prefork", concurrency: int = 2, wait: bool = True, **env: str
    ) -> WorkerProcess:
        self._n += 1
        merged = {**self.env, **env}
        w = WorkerProcess(
            "chaos_app",
            pool=pool,
            concurrency=concurrency,
            hostname=f"w{self._n}@%h",
            cwd=str(HERE),
            log_path=str(self.tmp_path / f"worker{self._n}.log"),
            env={
                "RELIER_TEST_REDIS": self.redis_url,
                "RELIER_TEST_POOL": pool,
                "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
                **merged,
            },
        )
        w.start()
        self.workers.append(w)
        if wait:
            w.wait_ready()
        return w

    def alive(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.proc is not None and w.proc.poll() is None]

    def kill_random(self, rng: random.Random) -> WorkerProcess:
        victim = rng.choice(self.alive())
        victim.kill()
        return victim

    def logs(self) -> str:
        return "\n".join(f"--- {w.hostname}\n{w.log()[-4000:]}" for w in self.workers)

    def stop_all(self) -> None:
        for w in self.workers:
            w.stop(timeout=10)


def send_work(app: Celery, ns: range, seconds: Any = 0.0) -> list[str]:
    ids = []
    for n in ns:
        secs = seconds(n) if callable(seconds) else seconds
        ids.append(app.send_task("chaos.work", args=(n, secs)).id)
    return ids


def done(r: redis.Redis) -> set[int]:
    return {int(x) for x in r.smembers("test:done")}


def wait_all_done(r: redis.Redis, expected: set[int], timeout: float, fleet: Fleet) -> None:
    try:
        wait_for(
            lambda: done(r) >= expected,
            timeout,
            interval=0.2,
            what=f"{len(expected)} tasks to complete",
        )
    except TimeoutError:
        missing = sorted(expected - done(r))
        raise AssertionError(
            f"{len(missing)} task(s) never completed: {missing[:20]}\n{fleet.logs()}"
        ) from None


def held_records(r: redis.Redis) -> int:
    keys = Keys("rl")
    return sum(r.hlen(k) for k in r.scan_iter(keys.held("*")))


def dlq_entries(r: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(v) for v in r.hvals(Keys("rl").dlq)]
