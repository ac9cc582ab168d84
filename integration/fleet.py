"""Helpers of the integration tests: a fleet of real workers, and counters read from Redis."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import warnings
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


def _reached_a_worker(r: redis.Redis, task_id: str) -> bool:
    """Whether any trace of the task exists: queued, in kombu's unacked hash, or recorded by
    relier (held, owned, finished)."""
    keys = Keys("rl")
    if r.exists(keys.done(task_id)) or r.hexists(keys.owners, task_id):
        return True
    for held in r.scan_iter(keys.held("*")):
        if any(field.startswith(f"{task_id}|") for field in r.hkeys(held)):
            return True
    return any(task_id in raw for raw in [*r.lrange("celery", 0, -1), *r.hvals("unacked")])


def wait_chaos_done(
    r: redis.Redis, ids: dict[int, str], timeout: float, fleet: Fleet, quiet_for: float = 10.0
) -> list[int]:
    """Wait until every task completes. A task of which no trace is left anywhere (kombu's
    Redis transport pops a message with BRPOP, then writes it to its unacked hash in a second
    round trip: a worker SIGKILLed in between loses it before any consumer code, relier
    included, sees it) is reported, and returned, instead of failing; at most one is allowed.
    Anything else that does not complete fails the test."""
    expected = set(ids)
    deadline = time.monotonic() + timeout
    quiet_since: float | None = None
    while time.monotonic() < deadline:
        missing = expected - done(r)
        if not missing:
            return []
        if len(missing) <= 1 and not any(_reached_a_worker(r, ids[n]) for n in missing):
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since > quiet_for:
                break
        else:
            quiet_since = None
        time.sleep(0.5)
    missing = expected - done(r)
    vanished = sorted(n for n in missing if not _reached_a_worker(r, ids[n]))
    if missing - set(vanished) or len(vanished) > 1:
        raise AssertionError(
            f"task(s) never completed: {sorted(missing)[:20]} (of which no trace anywhere: "
            f"{vanished})\n{fleet.logs()}"
        )
    if vanished:
        warnings.warn(
            f"task {vanished} vanished inside kombu's Redis transport (popped, never delivered) "
            "when its worker was SIGKILLed: a broker-side loss relier cannot see",
            stacklevel=2,
        )
    return vanished


def relier_cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``celery -A chaos_app relier ...`` as an operator runs it."""
    env = {
        **os.environ,
        "RELIER_TEST_REDIS": redis_url,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "chaos_app", "relier", *args],
        cwd=HERE,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
